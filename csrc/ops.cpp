// Operator schemas of the fastflow extension and the Python module entry point.
//
// Implementations are registered per device in step_cpu.cpp and step_cuda.cpp;
// fake (meta) implementations for torch.compile live in fastflow/backends/cuda.py.
// The module has no Python functions: importing it runs the registrations, and
// Python calls the operators through torch.ops.fastflow (no pybind11, which keeps
// the build fast).
#include <Python.h>
#include <torch/library.h>

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

static PyModuleDef fastflow_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "fastflow's compiled operators (registered under torch.ops.fastflow)", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastflow_c_module); }
