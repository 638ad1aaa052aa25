// Operator schemas of the fastflow extension and the Python module.
//
// Implementations are registered per device in step_cpu.cpp and step_cuda.cpp;
// fake (meta) implementations for torch.compile live in fastflow/backends/cuda.py.
//
// The module also binds `fused_step` directly (pybind11), for eager calls: it runs
// the operator's pieces (prepare_step, then the device's run_prepared_*) but skips
// the dispatcher's Python argument parsing, which costs a few microseconds per call.
// `fused_step_alloc` is the same call allocating its outputs in C++, the front ends'
// per-step entry, with its arguments parsed by hand (a CPython fast call). Traced
// code (torch.compile) calls the operator, which the tracer can see.
#include <ATen/EmptyTensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#if defined(FASTFLOW_WITH_CUDA)
#include <ATen/cuda/EmptyTensor.h>
#endif
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>
#include <torch/python.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#include "step_ops.h"

TORCH_LIBRARY(fastflow, m) {
  // One stage of a step plan (fastflow/backends/base.py is the contract). `step` is
  // used when `step_tensor` is None; otherwise the kernel reads the step on the device.
  m.def(
      "fused_step(Tensor z, Tensor(a!) out, Tensor model_out, Tensor? model_out_uncond, Tensor[] history, "
      "Tensor table, int step, Tensor? step_tensor, Tensor? seeds, Tensor? noise, Tensor(b!)? x_out, "
      "Tensor(c!)? model_in_out, float? clip, bool use_noise) -> ()");
  // fastflow's normal noise for each seed: float32 [len(seeds), *sample_shape].
  m.def("noise(Tensor seeds, int[] sample_shape, int step, Tensor? step_tensor, int tag) -> Tensor");
  // Raw Philox4x32 words (int64 holding uint32): counter [..., 4], key [..., 2].
  m.def("philox(Tensor counter, Tensor key, int rounds=10) -> Tensor");
}

namespace {

// An uninitialized contiguous tensor for an output the kernel writes whole, made by
// the device's allocator directly (at::empty's dispatch costs about as much again);
// other devices take at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype, c10::Device device) {
  if (device.is_cpu()) return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, std::nullopt);
#if defined(FASTFLOW_WITH_CUDA)
  if (device.is_cuda()) return at::detail::empty_cuda(sizes, dtype, device, std::nullopt);
#endif
  return at::empty(sizes, at::TensorOptions().dtype(dtype).device(device));
}

// The operator's body without the dispatcher: prepare the launch (a paired model
// output read in place, see step_host.h) and run the kernel of the state's device.
void run_step(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
              const std::optional<at::Tensor>& model_out_uncond, at::TensorList history,
              const at::Tensor& table, int64_t step, const std::optional<at::Tensor>& step_tensor,
              const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise,
              const std::optional<at::Tensor>& x_out, const std::optional<at::Tensor>& model_in_out,
              std::optional<double> clip, bool use_noise, bool paired) {
  bool cuda = false;
#if defined(FASTFLOW_WITH_CUDA)
  cuda = z.is_cuda();
#endif
  TORCH_CHECK_VALUE(z.is_cpu() || cuda, "fastflow._C has no kernel for tensors on ", z.device());
  const c10::OptionalDeviceGuard guard(z.device());  // for the inputs' contiguous copies and the launch
  fastflow::PreparedStep s = fastflow::prepare_step(z, out, model_out, model_out_uncond, history, table, step,
                                                    step_tensor, seeds, noise, x_out, model_in_out, clip, use_noise,
                                                    paired);
#if defined(FASTFLOW_WITH_CUDA)
  if (cuda) {
    fastflow::run_prepared_cuda(s, z.device());
    return;
  }
#endif
  fastflow::run_prepared_cpu(s);
}

// Whether an eager call releases the GIL while it runs: a CPU step is synchronous and
// takes milliseconds at megabytes, and other Python threads (a UI, a data loader) should
// run meanwhile, as they do during torch's own ops. Small or CUDA steps (an asynchronous
// launch) keep it: releasing and taking it back on every call measured up to about
// 0.3 us more a call on tiny CPU tensors (a noisy, loaded host).
bool runs_long(const at::Tensor& z) {
  constexpr int64_t kLongStepElements = int64_t{1} << 16;
  return z.is_cpu() && z.numel() >= kLongStepElements;
}

// Whether a call must go through torch's dispatcher rather than straight to a kernel: a tensor that only Python's
// dispatch can run (a fake or functional tensor, as torch.export's default non-strict tracing and FakeTensorMode
// make, or another tensor subclass), or an active TorchDispatchMode. The kernels read data pointers that such
// tensors do not have; the operator reaches their fake implementation or the mode instead. A few bit tests a call.
bool needs_dispatcher(std::initializer_list<const at::Tensor*> tensors, at::TensorList history) {
  static const c10::DispatchKeySet python_keys =
      c10::DispatchKeySet(c10::DispatchKey::Python) | c10::DispatchKeySet(c10::DispatchKey::Functionalize);
  if (c10::impl::TorchDispatchModeTLS::any_modes_set()) return true;
  for (const at::Tensor* t : tensors) {
    if (t != nullptr && t->key_set().has_any(python_keys)) return true;
  }
  for (const at::Tensor& h : history) {
    if (h.key_set().has_any(python_keys)) return true;
  }
  return false;
}

const at::Tensor* maybe(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// The registered operator, called through the dispatcher (see needs_dispatcher).
void fused_step_operator(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
                         const std::optional<at::Tensor>& model_out_uncond, at::TensorList history,
                         const at::Tensor& table, int64_t step, const std::optional<at::Tensor>& step_tensor,
                         const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Tensor>& x_out, const std::optional<at::Tensor>& model_in_out,
                         std::optional<double> clip, bool use_noise) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastflow::fused_step", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                      at::TensorList, const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, std::optional<double>,
                      bool)>();
  op.call(z, out, model_out, model_out_uncond, history, table, step, step_tensor, seeds, noise, x_out, model_in_out,
          clip, use_noise);
}

// The operator's body as the eager entry `fastflow._C.fused_step`.
// A state dense in another order (channels_last) is stepped in it, every tensor viewed in that order (see
// fastflow::dense_order), so outputs in its layout are written in place; not where the kernel draws noise.
void fused_step_direct(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
                       const std::optional<at::Tensor>& model_out_uncond, const std::vector<at::Tensor>& history,
                       const at::Tensor& table, int64_t step, const std::optional<at::Tensor>& step_tensor,
                       const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise,
                       const std::optional<at::Tensor>& x_out, const std::optional<at::Tensor>& model_in_out,
                       std::optional<double> clip, bool use_noise) {
  if (needs_dispatcher({&z, &out, &model_out, maybe(model_out_uncond), &table, maybe(step_tensor), maybe(seeds),
                        maybe(noise), maybe(x_out), maybe(model_in_out)},
                       history)) {
    fused_step_operator(z, out, model_out, model_out_uncond, history, table, step, step_tensor, seeds, noise, x_out,
                        model_in_out, clip, use_noise);
    return;
  }
  std::optional<pybind11::gil_scoped_release> no_gil;  // pybind11 has converted the arguments
  if (runs_long(z)) no_gil.emplace();
  std::vector<int64_t> order;
  // A model input of batch B or 2B shaped like the state otherwise (another is refused by the checks, in the
  // caller's order).
  const bool model_in_like = !model_in_out.has_value() ||
                             (fastflow::same_sample_shape(*model_in_out, z) &&
                              (model_in_out->size(0) == z.size(0) || model_in_out->size(0) == 2 * z.size(0)));
  if (!z.is_contiguous() && !(use_noise && !noise.has_value()) && model_in_like) {
    order = fastflow::dense_order(
        z, {&out, &model_out, model_out_uncond ? &*model_out_uncond : nullptr, noise ? &*noise : nullptr,
            x_out ? &*x_out : nullptr}, history);
  }
  if (order.empty()) {
    fastflow::refuse_overlaps(z, out, model_out, model_out_uncond, history, noise, x_out, model_in_out, use_noise);
    run_step(z, out, model_out, model_out_uncond, history, table, step, step_tensor, seeds, noise, x_out, model_in_out,
             clip, use_noise, false);
    return;
  }
  const std::vector<at::Tensor> hist = fastflow::in_order(history, order);
  const at::Tensor zp = z.permute(order), outp = out.permute(order), mop = model_out.permute(order);
  const auto up = fastflow::in_order(model_out_uncond, order), nop = fastflow::in_order(noise, order);
  const auto xp = fastflow::in_order(x_out, order);
  // A model input of another batch (doubled) has another shape: its order is the same permutation.
  const auto mip = fastflow::in_order(model_in_out, order);
  fastflow::refuse_overlaps(zp, outp, mop, up, hist, nop, xp, mip, use_noise);
  run_step(zp, outp, mop, up, hist, table, step, step_tensor, seeds, nop, xp, mip, clip, use_noise, false);
}

// fused_step_alloc_direct's body for tensors viewed in `order` (empty: their own): outputs made contiguous in that
// order and returned in the caller's (views), a given `out` returned as the caller's tensor (`given`).
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> fused_step_alloc_ordered(
    const at::Tensor& z, const std::optional<at::Tensor>& out, const at::Tensor& model_out,
    const std::optional<at::Tensor>& model_out_uncond, at::TensorList history, const at::Tensor& table, int64_t step,
    const std::optional<at::Tensor>& step_tensor, const std::optional<at::Tensor>& seeds,
    const std::optional<at::Tensor>& noise, bool want_x, std::optional<at::ScalarType> x_dtype,
    std::optional<at::ScalarType> model_in_dtype, bool model_in_double, std::optional<double> clip, bool use_noise,
    bool paired, at::IntArrayRef order, const std::optional<at::Tensor>& given) {
  const c10::Device device = z.device();
  if (out.has_value()) {  // the out= path only: a fresh output overlaps nothing
    fastflow::refuse_partial_overlap("out", *out, z, model_out, model_out_uncond, history, noise, use_noise, paired);
  }
  const at::Tensor next = out.has_value() ? *out : empty_output(z.sizes(), z.scalar_type(), device);
  std::optional<at::Tensor> x_out;
  if (want_x) x_out = empty_output(z.sizes(), x_dtype.value_or(z.scalar_type()), device);
  std::optional<at::Tensor> model_in;
  if (model_in_dtype.has_value()) {
    TORCH_CHECK_VALUE(z.dim() >= 1, "fastflow: the state needs a batch dimension");
    std::vector<int64_t> shape(z.sizes().begin(), z.sizes().end());
    if (model_in_double) shape[0] *= 2;
    model_in = empty_output(shape, *model_in_dtype, device);
  }
  run_step(z, next, model_out, model_out_uncond, history, table, step, step_tensor, seeds, noise, x_out, model_in, clip,
           use_noise, paired);
  if (order.empty()) return {next, x_out, model_in};
  const std::vector<int64_t> inverse = fastflow::inverse_order(order);
  return {given.has_value() ? *given : next.permute(inverse), fastflow::in_order(x_out, inverse),
          fastflow::in_order(model_in, inverse)};
}

// The same stage, allocating the outputs the caller did not pass: the next state
// (when `out` is None), x_hat (when `want_x`; in `x_dtype` when given, else the
// state's) and the next model input (when `model_in_dtype` is given; its batch
// doubled with `model_in_double`). Allocating here costs a fraction of a
// Python-side torch.empty per tensor, and eager front ends make up to three per
// step. Outputs are contiguous, shaped like the state; in the state's layout where it is dense in another order
// (channels_last) and the kernel draws no noise (fastflow::dense_order). With `paired`,
// `model_out` is a guided model's doubled batch, unconditional half first, read in
// place through two pointers (views, in Python or C++, would cost about a
// microsecond each).
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> fused_step_alloc_direct(
    const at::Tensor& z, const std::optional<at::Tensor>& out, const at::Tensor& model_out,
    const std::optional<at::Tensor>& model_out_uncond, at::TensorList history, const at::Tensor& table, int64_t step,
    const std::optional<at::Tensor>& step_tensor, const std::optional<at::Tensor>& seeds,
    const std::optional<at::Tensor>& noise, bool want_x, std::optional<at::ScalarType> x_dtype,
    std::optional<at::ScalarType> model_in_dtype, bool model_in_double, std::optional<double> clip, bool use_noise,
    bool paired) {
  std::vector<int64_t> order;  // z's own order where it is dense in one and the kernel draws no noise
  // a paired model output has another batch: the same permutation serves it, so only its sample shape is compared
  if (!z.is_contiguous() && !(use_noise && !noise.has_value()) &&
      (!paired || fastflow::same_sample_shape(model_out, z))) {
    order = fastflow::dense_order(
        z, {out ? &*out : nullptr, paired ? nullptr : &model_out, model_out_uncond ? &*model_out_uncond : nullptr,
            noise ? &*noise : nullptr}, history);
  }
  if (!order.empty()) {
    return fused_step_alloc_ordered(z.permute(order), fastflow::in_order(out, order), model_out.permute(order),
                                    fastflow::in_order(model_out_uncond, order), fastflow::in_order(history, order),
                                    table, step, step_tensor, seeds, fastflow::in_order(noise, order), want_x, x_dtype,
                                    model_in_dtype, model_in_double, clip, use_noise, paired, order, out);
  }
  return fused_step_alloc_ordered(z, out, model_out, model_out_uncond, history, table, step, step_tensor, seeds, noise,
                                  want_x, x_dtype, model_in_dtype, model_in_double, clip, use_noise, paired, order,
                                  out);
}

// `fastflow._C.fused_step_alloc`, the per-step entry of the front ends (fastflow/runner.py
// calls it with no Python layer between). Its 16 positional arguments, in the order of
// fastflow.backends.base.AllocEntry, are parsed here by hand: with pybind11's casters the
// call took about 0.25 us more on a CPU host (0.81 against 0.57 us with nothing to allocate).
constexpr const char* kAllocArgs[] = {"z", "out", "model_out", "model_out_uncond", "history", "table",
                                      "step", "seeds", "noise", "want_x", "x_dtype", "model_in_dtype",
                                      "model_in_double", "clip", "use_noise", "paired"};
constexpr Py_ssize_t kNumAllocArgs = sizeof(kAllocArgs) / sizeof(kAllocArgs[0]);

const at::Tensor& tensor_arg(PyObject* const* args, int i) {
  TORCH_CHECK_TYPE(THPVariable_Check(args[i]), "fastflow._C.fused_step_alloc: ", kAllocArgs[i],
                   " must be a tensor, got ", Py_TYPE(args[i])->tp_name);
  return THPVariable_Unpack(args[i]);
}

std::optional<at::Tensor> optional_tensor_arg(PyObject* const* args, int i) {
  if (args[i] == Py_None) return std::nullopt;
  return tensor_arg(args, i);
}

bool bool_arg(PyObject* const* args, int i) {
  const int truth = PyObject_IsTrue(args[i]);
  if (truth < 0) throw python_error();
  return truth != 0;
}

std::optional<at::ScalarType> dtype_arg(PyObject* const* args, int i) {
  if (args[i] == Py_None) return std::nullopt;
  TORCH_CHECK_TYPE(THPDtype_Check(args[i]), "fastflow._C.fused_step_alloc: ", kAllocArgs[i],
                   " must be a torch.dtype or None, got ", Py_TYPE(args[i])->tp_name);
  return reinterpret_cast<THPDtype*>(args[i])->scalar_type;
}

PyObject* wrap(const std::optional<at::Tensor>& t) {
  if (t.has_value()) return THPVariable_Wrap(*t);
  Py_RETURN_NONE;
}

// What fused_step_alloc calls, with its own arguments, where needs_dispatcher holds: a Python function that makes
// the outputs with torch and steps through the operator (fastflow/backends/cuda.py sets it when it loads the module).
PyObject* python_entry = nullptr;

PyObject* set_python_entry_py(PyObject* /*module*/, PyObject* entry) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(PyCallable_Check(entry), "fastflow._C.set_python_entry takes a callable, got ",
                   Py_TYPE(entry)->tp_name);
  Py_INCREF(entry);
  Py_XSETREF(python_entry, entry);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef set_python_entry_def = {
    "set_python_entry", set_python_entry_py, METH_O,
    "The function fused_step_alloc calls, with its arguments, for fake, functional or subclassed tensors or under "
    "a TorchDispatchMode (fastflow.backends.cuda sets it)."};

PyObject* fused_step_alloc_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == kNumAllocArgs, "fastflow._C.fused_step_alloc takes ", kNumAllocArgs,
                   " positional arguments (fastflow.backends.base.AllocEntry), got ", nargs);
  PyObject* hist = args[4];
  TORCH_CHECK_TYPE(PyList_Check(hist) || PyTuple_Check(hist),
                   "fastflow._C.fused_step_alloc: history must be a list or tuple of tensors, got ",
                   Py_TYPE(hist)->tp_name);
  const Py_ssize_t num_history = PySequence_Fast_GET_SIZE(hist);
  std::vector<at::Tensor> history;
  history.reserve(num_history);
  for (Py_ssize_t j = 0; j < num_history; ++j) {
    PyObject* h = PySequence_Fast_GET_ITEM(hist, j);
    TORCH_CHECK_TYPE(THPVariable_Check(h), "fastflow._C.fused_step_alloc: history holds a ", Py_TYPE(h)->tp_name,
                     ", not a tensor");
    history.push_back(THPVariable_Unpack(h));
  }
  int64_t step = 0;
  std::optional<at::Tensor> step_tensor;
  if (THPVariable_Check(args[6])) {
    step_tensor = THPVariable_Unpack(args[6]);
  } else {
    TORCH_CHECK_TYPE(!PyBool_Check(args[6]) && (PyLong_Check(args[6]) || PyIndex_Check(args[6])),
                     "fastflow._C.fused_step_alloc: step must be an int or a tensor, got ", Py_TYPE(args[6])->tp_name);
    step = PyLong_AsLongLong(args[6]);  // calls __index__ for integer types that are not int
    if (step == -1 && PyErr_Occurred()) throw python_error();
  }
  std::optional<double> clip;
  if (args[13] != Py_None) {
    clip = PyFloat_AsDouble(args[13]);
    if (*clip == -1.0 && PyErr_Occurred()) throw python_error();
  }
  const at::Tensor& z = tensor_arg(args, 0);
  const std::optional<at::Tensor> out = optional_tensor_arg(args, 1);
  const at::Tensor& model_out = tensor_arg(args, 2);
  const std::optional<at::Tensor> model_out_uncond = optional_tensor_arg(args, 3);
  const at::Tensor& table = tensor_arg(args, 5);
  const std::optional<at::Tensor> seeds = optional_tensor_arg(args, 7);
  const std::optional<at::Tensor> noise = optional_tensor_arg(args, 8);
  const bool want_x = bool_arg(args, 9), model_in_double = bool_arg(args, 12);
  const bool use_noise = bool_arg(args, 14), paired = bool_arg(args, 15);
  const std::optional<at::ScalarType> x_dtype = dtype_arg(args, 10), model_in_dtype = dtype_arg(args, 11);
  if (needs_dispatcher({&z, maybe(out), &model_out, maybe(model_out_uncond), &table, maybe(step_tensor), maybe(seeds),
                        maybe(noise)},
                       history)) {
    TORCH_CHECK(python_entry != nullptr,
                "fastflow._C.fused_step_alloc was given fake, functional or subclassed tensors (or runs under a "
                "TorchDispatchMode), which need the Python entry that importing fastflow.backends.cuda sets");
    return PyObject_Vectorcall(python_entry, args, nargs, nullptr);
  }
  std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> outputs;
  {
    std::optional<pybind11::gil_scoped_release> no_gil;  // the arguments are parsed above, under the GIL
    if (runs_long(z)) no_gil.emplace();
    outputs = fused_step_alloc_direct(z, out, model_out, model_out_uncond, history, table, step, step_tensor, seeds,
                                      noise, want_x, x_dtype, model_in_dtype, model_in_double, clip, use_noise,
                                      paired);
  }
  auto& [next, x_out, model_in] = outputs;
  PyObject* items[3] = {THPVariable_Wrap(next), wrap(x_out), wrap(model_in)};
  PyObject* result = items[0] && items[1] && items[2] ? PyTuple_Pack(3, items[0], items[1], items[2]) : nullptr;
  for (PyObject* item : items) Py_XDECREF(item);
  if (result == nullptr) throw python_error();
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef fused_step_alloc_def = {
    "fused_step_alloc", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fused_step_alloc_py)),
    METH_FASTCALL,
    "fused_step that allocates the outputs not given; returns (out, x_out or None, model_in or None). Arguments: "
    "those of fastflow.backends.base.AllocEntry, positional."};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastflow's compiled operators (registered under torch.ops.fastflow)";
  m.def("fused_step", &fused_step_direct, "One stage of a step plan, without the dispatcher (eager calls).");
  PyObject* alloc = PyCFunction_NewEx(&fused_step_alloc_def, nullptr, m.attr("__name__").ptr());
  if (alloc == nullptr) throw pybind11::error_already_set();
  m.attr("fused_step_alloc") = pybind11::reinterpret_steal<pybind11::object>(alloc);
  PyObject* set_entry = PyCFunction_NewEx(&set_python_entry_def, nullptr, m.attr("__name__").ptr());
  if (set_entry == nullptr) throw pybind11::error_already_set();
  m.attr("set_python_entry") = pybind11::reinterpret_steal<pybind11::object>(set_entry);
  m.attr("with_cuda") =
#if defined(FASTFLOW_WITH_CUDA)
      true;
#else
      false;
#endif
}
