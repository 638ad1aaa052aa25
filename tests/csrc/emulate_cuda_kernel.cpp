// Test harness: the CUDA kernel's per-thread code (csrc/step_kernel_body.h) run on
// the CPU, one emulated thread after another, behind the same argument handling as
// the real operators (csrc/step_host.h). Built by tests/csrc/test_cuda_kernel_emulated.py.
#include <torch/python.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "step_host.h"
#include "step_kernel_body.h"

namespace {

// `threads`: emulated grid size (threads in the launch); <= 0 means one thread per item.
void fused_step_emulated(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
                         const std::optional<at::Tensor>& model_out_uncond, const std::vector<at::Tensor>& history,
                         const at::Tensor& table, int64_t step, const std::optional<at::Tensor>& step_tensor,
                         const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Tensor>& x_out, const std::optional<at::Tensor>& model_in_out,
                         std::optional<double> clip, bool use_noise, int64_t threads) {
  fastflow::PreparedStep s = fastflow::prepare_step(z, out, model_out, model_out_uncond, history, table, step,
                                                    step_tensor, seeds, noise, x_out, model_in_out, clip, use_noise);
  if (s.empty) return;
  const int64_t items_per_sample = (s.p.numel + fastflow::kVec - 1) / fastflow::kVec;
  const int64_t total = s.p.batch * items_per_sample;
  const int64_t stride = threads > 0 ? std::min(threads, total) : total;
  // The same instantiation choice as the launcher in csrc/step_kernel.cu.
  const bool draw = fastflow::draws_noise(s.p);
  for (int64_t t = 0; t < stride; ++t) {
    if (s.compute_double) {
      fastflow::fused_step_items<double, true>(s.p, items_per_sample, t, stride);
    } else {
      draw ? fastflow::fused_step_items<float, true>(s.p, items_per_sample, t, stride)
           : fastflow::fused_step_items<float, false>(s.p, items_per_sample, t, stride);
    }
  }
  s.finish();
}

bool vectorized(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out) {
  return fastflow::prepare_step(z, out, model_out, std::nullopt, {}, at::zeros({1, fastflow::kNumCoefs}), 0,
                                std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                                false)
             .p.vectorized != 0;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_step", &fused_step_emulated);
  m.def("vectorized", &vectorized);
}
