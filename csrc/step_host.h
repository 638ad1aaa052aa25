// Host side of the operators: validate at::Tensor arguments and turn them into
// the torch-free StepParams the CPU loop and the CUDA kernel read. With `paired`,
// the model output is a guided model's doubled batch (uncond half first), read
// through two pointers into it (no views made: a view costs more than this call).
//
// Checks are metadata only (no device sync) and raise the Python exception types
// of fastflow.backends.base.check_step_args (ValueError for shapes and devices,
// TypeError for dtypes), so callers need no second, Python-side check. Inputs that are not contiguous are
// copied to contiguous tensors; outputs that are not contiguous are written to a
// contiguous temporary and copied back, so the kernels only see dense row-major
// samples (the noise of element e depends on its row-major index in the sample). The
// entries in ops.cpp pass a state dense in another order (channels_last) as permuted
// views (dense_order below), which are contiguous here, unless the stage draws noise.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "fastflow_step.h"

namespace fastflow {

inline int dtype_code(c10::ScalarType t, const char* name) {
  switch (t) {
    case c10::ScalarType::Float:
      return kFloat32;
    case c10::ScalarType::Half:
      return kFloat16;
    case c10::ScalarType::BFloat16:
      return kBFloat16;
    case c10::ScalarType::Double:
      return kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "fastflow: ", name, " must be float32, float16, bfloat16 or float64, got ", t);
  }
  return kFloat32;
}

// A launch prepared from tensors: the params plus whatever keeps them valid.
struct PreparedStep {
  StepParams p;
  bool compute_double = false;
  bool empty = false;
  std::vector<at::Tensor> keep;                              // contiguous copies of inputs
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;  // (destination, contiguous temporary)

  // Copies temporaries back into non-contiguous outputs after the kernel ran.
  void finish() {
    for (auto& dw : writeback) dw.first.copy_(dw.second);
  }
};

namespace detail {

inline void check_like(const at::Tensor& z, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == z.sizes(), "fastflow: ", name, " has shape ", t.sizes(), ", state has ", z.sizes());
  TORCH_CHECK_VALUE(t.device() == z.device(), "fastflow: ", name, " is on ", t.device(), ", state is on ", z.device());
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace detail

// A written tensor that overlaps an input in part is refused (ValueError, as fastflow.backends.base.check_out_overlap
// does): the kernels run block by block, so an element could be overwritten before another block reads it. The same
// bytes with the same element size (`out` is `z`) are fine, as each element is read before it is written. Only
// contiguous tensors are compared: step_host.h reads a copy of any other input and writes any other output through
// a temporary. A paired model output is read as two halves, each compared alone. Metadata and pointers only.
inline void refuse_partial_overlap(const char* name, const at::Tensor& written, const at::Tensor& z,
                                   const at::Tensor& model_out, const std::optional<at::Tensor>& model_out_uncond,
                                   at::TensorList history, const std::optional<at::Tensor>& noise, bool use_noise,
                                   bool paired) {
  if (!(written.is_cpu() || written.is_cuda()) || !written.is_contiguous() || written.numel() == 0) return;
  const auto* w0 = static_cast<const char*>(written.data_ptr());
  const auto* w1 = w0 + written.numel() * written.element_size();
  auto refuse = [&](const char* what, const char* t0, const char* t1, int64_t item) {
    const bool same = t0 == w0 && t1 == w1 && item == written.element_size();
    TORCH_CHECK_VALUE(!(t0 < w1 && w0 < t1) || same, "fastflow: ", name, " overlaps ", what,
                      " in part; the kernels write block by block, so pass a separate tensor or exactly the same one");
  };
  auto compare = [&](const char* what, const at::Tensor& t, bool halves = false) {
    if (t.is_same(written) || !t.is_contiguous() || t.numel() == 0 || t.device() != written.device()) return;
    const auto* t0 = static_cast<const char*>(t.data_ptr());
    const int64_t bytes = t.numel() * t.element_size();
    if (halves) {
      refuse("the unconditional half of the model output", t0, t0 + bytes / 2, t.element_size());
      refuse("the conditional half of the model output", t0 + bytes / 2, t0 + bytes, t.element_size());
    } else {
      refuse(what, t0, t0 + bytes, t.element_size());
    }
  };
  compare("the state", z);
  compare("the model output", model_out, paired);
  if (model_out_uncond.has_value()) compare("the unconditional model output", *model_out_uncond);
  for (const at::Tensor& h : history) compare("a history tensor", h);
  if (use_noise && noise.has_value()) compare("the noise", *noise);
}

// Refuse two outputs that overlap each other in part (the state's and x_hat's, say): each is written block by
// block, so which value an element ends with would depend on the launch. The same tensor twice is fine.
inline void refuse_outputs_overlap(const at::Tensor& out, const std::optional<at::Tensor>& x_out,
                                   const std::optional<at::Tensor>& model_in_out) {
  const at::Tensor* outputs[3] = {&out, x_out.has_value() ? &*x_out : nullptr,
                                  model_in_out.has_value() ? &*model_in_out : nullptr};
  const char* names[3] = {"out", "x_out", "model_in_out"};
  for (int i = 0; i < 3; ++i) {
    for (int j = i + 1; j < 3; ++j) {
      const at::Tensor* a = outputs[i];
      const at::Tensor* b = outputs[j];
      if (a == nullptr || b == nullptr || a->is_same(*b) || a->numel() == 0 || b->numel() == 0) continue;
      if (a->device() != b->device() || !(a->is_cpu() || a->is_cuda())) continue;
      const auto* a0 = static_cast<const char*>(a->data_ptr());
      const auto* b0 = static_cast<const char*>(b->data_ptr());
      // spans from the storage offsets of the elements at both ends, any strides
      const auto span = [](const at::Tensor& t, const char* p0) {
        int64_t lo = 0, hi = 0;
        for (int64_t d = 0; d < t.dim(); ++d) {
          const int64_t reach = (t.size(d) - 1) * t.stride(d);
          (reach < 0 ? lo : hi) += reach;
        }
        return std::make_pair(p0 + lo * t.element_size(), p0 + (hi + 1) * t.element_size());
      };
      const auto [a_lo, a_hi] = span(*a, a0);
      const auto [b_lo, b_hi] = span(*b, b0);
      const bool same = a_lo == b_lo && a_hi == b_hi && a->element_size() == b->element_size() &&
                        a->strides() == b->strides() && a->sizes() == b->sizes();
      TORCH_CHECK_VALUE(!(a_lo < b_hi && b_lo < a_hi) || same, "fastflow: ", names[i], " and ", names[j],
                        " overlap in part; the kernels write each block by block, so pass separate tensors or the "
                        "same one");
    }
  }
}

// Every tensor a fused_step call writes, against its inputs and against each other: the eager entry and the
// registered operators (a traced step calls the operator) refuse the same calls.
inline void refuse_overlaps(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
                            const std::optional<at::Tensor>& model_out_uncond, at::TensorList history,
                            const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& x_out,
                            const std::optional<at::Tensor>& model_in_out, bool use_noise) {
  refuse_partial_overlap("out", out, z, model_out, model_out_uncond, history, noise, use_noise, false);
  refuse_outputs_overlap(out, x_out, model_in_out);
  if (x_out.has_value()) {
    refuse_partial_overlap("x_out", *x_out, z, model_out, model_out_uncond, history, noise, use_noise, false);
  }
  if (model_in_out.has_value()) {
    refuse_partial_overlap("model_in_out", *model_in_out, z, model_out, model_out_uncond, history, noise, use_noise,
                           false);
  }
}

// The order of z's dimensions, batch first, in which its memory is row-major ({0, 2, 3, 1} for channels_last), where
// that is not their own order and every tensor given has z's shape; empty otherwise (row-major already, dense in no
// such order, or a shape the checks refuse). The allocating and direct entries step such a state in that order, as
// permuted views (no copy of it; outputs made in its layout), as TensorIterator does (fastflow.backends.base.dense_order
// is the same rule). Metadata only.
inline std::vector<int64_t> dense_order(const at::Tensor& z, std::initializer_list<const at::Tensor*> others,
                                        at::TensorList history) {
  std::vector<int64_t> order;
  if (z.dim() < 3 || z.is_contiguous()) return order;
  order.resize(z.dim());
  for (int64_t d = 0; d < z.dim(); ++d) order[d] = d;
  const auto strides = z.strides();
  std::stable_sort(order.begin() + 1, order.end(), [&](int64_t a, int64_t b) { return strides[a] > strides[b]; });
  bool identity = true;
  for (int64_t d = 0; d < z.dim(); ++d) identity = identity && order[d] == d;
  bool same_shapes = true;
  for (const at::Tensor* t : others) same_shapes = same_shapes && (t == nullptr || t->sizes() == z.sizes());
  for (const at::Tensor& h : history) same_shapes = same_shapes && h.sizes() == z.sizes();
  if (identity || !same_shapes || !z.permute(order).is_contiguous()) order.clear();
  return order;
}

// `t` viewed in `order` (a dense_order, or its inverse); `t` itself when the order is empty.
inline std::optional<at::Tensor> in_order(const std::optional<at::Tensor>& t, at::IntArrayRef order) {
  if (!t.has_value() || order.empty()) return t;
  return t->permute(order);
}

// Every tensor of `ts` viewed in `order` (a non-empty dense_order).
inline std::vector<at::Tensor> in_order(at::TensorList ts, at::IntArrayRef order) {
  std::vector<at::Tensor> viewed;
  viewed.reserve(ts.size());
  for (const at::Tensor& t : ts) viewed.push_back(t.permute(order));
  return viewed;
}

// Whether `t` is shaped like a sample of the state `z` with any batch (a doubled model output or model input is
// viewed in z's dense order by the same permutation).
inline bool same_sample_shape(const at::Tensor& t, const at::Tensor& z) {
  return t.dim() == z.dim() && t.sizes().slice(1) == z.sizes().slice(1);
}

inline std::vector<int64_t> inverse_order(at::IntArrayRef order) {
  std::vector<int64_t> inverse(order.size());
  for (size_t k = 0; k < order.size(); ++k) inverse[order[k]] = static_cast<int64_t>(k);
  return inverse;
}

// The noise operators' host counters: the spec's words are 32 bits (the Python wrappers check the same).
inline void check_noise_counters(int64_t step, int64_t tag) {
  TORCH_CHECK_VALUE(step >= 0 && step <= 0xFFFFFFFFLL, "fastflow: the noise step must be in [0, 2**32), got ", step);
  TORCH_CHECK_VALUE(tag >= 0 && tag <= 0xFFFFFFFFLL, "fastflow: the noise tag must be in [0, 2**32), got ", tag);
}

// Philox rounds as the raw operator takes them (the spec uses 10).
inline void check_philox_rounds(int64_t rounds) {
  TORCH_CHECK_VALUE(rounds >= 0 && rounds <= 64, "fastflow: philox rounds must be in [0, 64], got ", rounds);
}

inline PreparedStep prepare_step(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
                                 const std::optional<at::Tensor>& model_out_uncond, at::TensorList history,
                                 const at::Tensor& table, int64_t step, const std::optional<at::Tensor>& step_tensor,
                                 const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise,
                                 const std::optional<at::Tensor>& x_out, const std::optional<at::Tensor>& model_in_out,
                                 std::optional<double> clip, bool use_noise, bool paired = false) {
  using detail::check_like;
  PreparedStep s;
  StepParams& p = s.p;
  TORCH_CHECK_VALUE(z.dim() >= 1, "fastflow: the state needs a batch dimension");
  p.z_dtype = dtype_code(z.scalar_type(), "the state");
  s.compute_double = p.z_dtype == kFloat64;
  check_like(z, out, "the output state");
  TORCH_CHECK_TYPE(out.scalar_type() == z.scalar_type(), "fastflow: output state dtype ", out.scalar_type(),
                   " differs from the state's ", z.scalar_type());
  if (paired) {  // a guided model's doubled batch, uncond half first, read in place
    TORCH_CHECK_VALUE(!model_out_uncond.has_value(), "fastflow: a paired model output carries its own uncond half");
    TORCH_CHECK_VALUE(model_out.dim() == z.dim() && model_out.size(0) == 2 * z.size(0) &&
                          model_out.sizes().slice(1) == z.sizes().slice(1),
                      "fastflow: a paired model output needs batch ", 2 * z.size(0),
                      " (uncond first) and sample shape ", z.sizes().slice(1), ", got ", model_out.sizes());
    TORCH_CHECK_VALUE(model_out.device() == z.device(), "fastflow: the model output is on ", model_out.device(),
                      ", state is on ", z.device());
  } else {
    check_like(z, model_out, "the model output");
  }
  p.model_out_dtype = dtype_code(model_out.scalar_type(), "the model output");
  TORCH_CHECK_VALUE(history.size() <= static_cast<size_t>(kMaxHistory), "fastflow: at most ", kMaxHistory,
                    " history tensors, got ", history.size());

  // Table and step.
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == kNumCoefs, "fastflow: the coefficient table must be [stages, ",
                    kNumCoefs, "], got ", table.sizes());
  TORCH_CHECK_VALUE(table.device() == z.device(), "fastflow: the coefficient table is on ", table.device(),
                    ", the state is on ", z.device());
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble,
                   "fastflow: the coefficient table must be float32 or float64, got ", table.scalar_type());
  const at::Tensor tab = table.contiguous();
  if (!tab.is_same(table)) s.keep.push_back(tab);
  p.table = tab.data_ptr();
  p.table_dtype = table.scalar_type() == at::kDouble ? kFloat64 : kFloat32;
  p.table_rows = table.size(0);
  if (step_tensor.has_value()) {
    const at::Tensor& st = *step_tensor;
    TORCH_CHECK_VALUE(st.numel() == 1, "fastflow: the step tensor must have one element, got ", st.numel());
    TORCH_CHECK_VALUE(st.device() == z.device(), "fastflow: the step tensor is on ", st.device(), ", the state is on ",
                      z.device());
    TORCH_CHECK_TYPE(st.scalar_type() == at::kLong || st.scalar_type() == at::kInt,
                     "fastflow: the step tensor must be int64 or int32, got ", st.scalar_type());
    p.step_ptr = st.data_ptr();
    p.step_is_int32 = st.scalar_type() == at::kInt;
  } else {
    TORCH_CHECK_INDEX(step >= 0 && step < p.table_rows, "fastflow: step ", step, " is outside the table's ",
                      p.table_rows, " rows");
    p.step = step;
  }

  const int64_t batch = z.size(0);
  p.batch = batch;
  p.numel = batch > 0 ? z.numel() / batch : 0;
  s.empty = z.numel() == 0;

  // (pointer, element size) of every tensor the kernel touches, for the alignment test.
  std::array<std::pair<const void*, int64_t>, 10> used{};
  int num_used = 0;
  auto input = [&](const at::Tensor& t) -> const void* {
    at::Tensor c = t.contiguous();
    if (!c.is_same(t)) s.keep.push_back(c);
    used[num_used++] = {c.data_ptr(), c.element_size()};
    return c.data_ptr();
  };
  auto output = [&](const at::Tensor& t) -> void* {
    if (t.is_contiguous()) {
      used[num_used++] = {t.data_ptr(), t.element_size()};
      return t.data_ptr();
    }
    at::Tensor tmp = at::empty(t.sizes(), t.options());
    s.writeback.emplace_back(t, tmp);
    used[num_used++] = {tmp.data_ptr(), tmp.element_size()};
    return tmp.data_ptr();
  };

  p.z = input(z);
  p.model_out = input(model_out);
  if (paired) {
    p.uncond_dtype = p.model_out_dtype;
    p.model_out_uncond = p.model_out;
    p.model_out = static_cast<const char*>(p.model_out_uncond) + z.numel() * model_out.element_size();
    used[num_used++] = {p.model_out, model_out.element_size()};
  }
  if (model_out_uncond.has_value()) {
    check_like(z, *model_out_uncond, "the unconditional model output");
    p.uncond_dtype = dtype_code(model_out_uncond->scalar_type(), "the unconditional model output");
    p.model_out_uncond = input(*model_out_uncond);
  }
  p.num_history = static_cast<int>(history.size());
  for (size_t j = 0; j < history.size(); ++j) {
    check_like(z, history[j], "a history tensor");
    p.history_dtype[j] = dtype_code(history[j].scalar_type(), "a history tensor");
    p.history[j] = input(history[j]);
  }
  if (noise.has_value()) {  // checked even when unused (its dtype too), as the contract does
    check_like(z, *noise, "the noise");
    dtype_code(noise->scalar_type(), "the noise");
  }
  p.use_noise = use_noise;
  if (use_noise) {
    if (noise.has_value()) {
      p.noise_dtype = dtype_code(noise->scalar_type(), "the noise");
      p.noise = input(*noise);
    } else {
      TORCH_CHECK_VALUE(seeds.has_value(), "fastflow: this stage draws noise: pass seeds or an explicit noise tensor");
      const at::Tensor& sd = *seeds;
      const bool ok = sd.scalar_type() == at::kLong && sd.dim() == 1 && sd.size(0) == batch;
      TORCH_CHECK_VALUE(ok && sd.device() == z.device(), "fastflow: seeds must be int64 [", batch, "] on ", z.device());
      const at::Tensor c = sd.contiguous();
      if (!c.is_same(sd)) s.keep.push_back(c);
      p.seeds = c.data_ptr<int64_t>();
    }
  }
  if (clip.has_value()) {
    // NaN fails the test too: a clip that is not positive has no one clamp every backend agrees on
    TORCH_CHECK_VALUE(*clip > 0, "fastflow: clip must be a positive number or None, got ", *clip);
    TORCH_CHECK_VALUE(s.compute_double || *clip <= static_cast<double>(std::numeric_limits<float>::max()),
                      "fastflow: clip ", *clip, " is past float32's range, which a ", z.scalar_type(),
                      " state computes in");
    p.has_clip = 1;
    p.clip = *clip;
  }
  if (x_out.has_value()) {
    check_like(z, *x_out, "the x_hat output");
    p.x_out_dtype = dtype_code(x_out->scalar_type(), "the x_hat output");
    p.x_out = output(*x_out);
  }
  if (model_in_out.has_value()) {
    const at::Tensor& mi = *model_in_out;
    TORCH_CHECK_VALUE(mi.dim() == z.dim() && mi.sizes().slice(1) == z.sizes().slice(1) &&
                          (mi.size(0) == batch || mi.size(0) == 2 * batch),
                      "fastflow: the model input output has shape ", mi.sizes(), "; expected batch ", batch, " or ",
                      2 * batch, " and sample shape ", z.sizes().slice(1));
    TORCH_CHECK_VALUE(mi.device() == z.device(), "fastflow: the model input output is on ", mi.device(),
                      ", the state is on ", z.device());
    p.model_in_dtype = dtype_code(mi.scalar_type(), "the model input output");
    p.model_in_double = mi.size(0) == 2 * batch && batch > 0;
    p.model_in_out = output(mi);
  }
  p.out = output(out);

  // Every thread of the CUDA kernel reads the coefficient row, the device step and its sample's seed while other
  // blocks write their outputs (the CPU kernel reads the row once, its seeds block by block): an output overlapping
  // them would change them under the running launch, so what a thread reads would depend on the schedule. Refused
  // (ValueError, as a partial overlap); they never share all of an output's bytes. The pointers the kernels use: a
  // written temporary or an input's copy is fresh memory. Metadata and pointers only.
  if (!s.empty) {
    using Span = std::pair<const char*, const char*>;
    const auto span = [](const void* ptr, int64_t bytes) {
      return Span{static_cast<const char*>(ptr), static_cast<const char*>(ptr) + bytes};
    };
    const Span read[3] = {span(p.table, tab.numel() * tab.element_size()),
                          span(p.step_ptr, step_tensor.has_value() ? step_tensor->element_size() : 0),
                          span(p.seeds, p.seeds != nullptr ? batch * static_cast<int64_t>(sizeof(int64_t)) : 0)};
    const char* const read_names[3] = {"the coefficient table", "the step tensor", "the seeds"};
    const Span written[3] = {
        span(p.out, z.numel() * out.element_size()),
        span(p.x_out, x_out.has_value() ? z.numel() * x_out->element_size() : 0),
        span(p.model_in_out, model_in_out.has_value() ? model_in_out->numel() * model_in_out->element_size() : 0)};
    const char* const written_names[3] = {"out", "x_out", "model_in_out"};
    for (int w = 0; w < 3; ++w) {
      for (int r = 0; r < 3; ++r) {
        const bool overlap = written[w].first < written[w].second && read[r].first < read[r].second &&
                             written[w].first < read[r].second && read[r].first < written[w].second;
        TORCH_CHECK_VALUE(!overlap, "fastflow: ", written_names[w], " overlaps ", read_names[r],
                          ", which every block of the kernels reads; pass a separate tensor");
      }
    }
  }

  // Vector loads and stores need every base pointer and every sample start 16-byte aligned.
  bool vec = true;
  for (int i = 0; i < num_used; ++i) {
    vec = vec && detail::aligned16(used[i].first) && (p.numel * used[i].second) % 16 == 0;
  }
  p.vectorized = vec;
  return s;
}

}  // namespace fastflow
