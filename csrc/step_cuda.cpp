// CUDA implementations of the fastflow operators: at::Tensor arguments in, one
// kernel launch (step_kernel.cu) on the current stream out. Built only when the
// extension is compiled with CUDA. Nothing here reads device memory on the host,
// so every operator is free of host syncs and safe under CUDA-graph capture.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "fastflow_cuda.h"
#include "fastflow_step.h"
#include "step_host.h"
#include "step_ops.h"

namespace fastflow {
namespace {

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "fastflow: launching the ", what, " kernel failed: ", cuda_error_string(code));
}

}  // namespace

void fused_step_cuda(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
                     const std::optional<at::Tensor>& model_out_uncond, at::TensorList history,
                     const at::Tensor& table, int64_t step, const std::optional<at::Tensor>& step_tensor,
                     const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise,
                     const std::optional<at::Tensor>& x_out, const std::optional<at::Tensor>& model_in_out,
                     std::optional<double> clip, bool use_noise) {
  TORCH_CHECK(z.is_cuda(), "fastflow: the CUDA kernel got a tensor on ", z.device());
  refuse_overlaps(z, out, model_out, model_out_uncond, history, noise, x_out, model_in_out, use_noise);
  const c10::cuda::CUDAGuard guard(z.device());
  PreparedStep s = prepare_step(z, out, model_out, model_out_uncond, history, table, step, step_tensor, seeds, noise,
                                x_out, model_in_out, clip, use_noise);
  run_prepared_cuda(s, z.device());
}

void run_prepared_cuda(PreparedStep& s, c10::Device device) {
  if (s.empty) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  check_launch(launch_fused_step_cuda(s.p, s.compute_double, stream), "fused step");
  s.finish();
}

at::Tensor noise_cuda(const at::Tensor& seeds, at::IntArrayRef sample_shape, int64_t step,
                      const std::optional<at::Tensor>& step_tensor, int64_t tag) {
  TORCH_CHECK(seeds.is_cuda() && seeds.scalar_type() == at::kLong && seeds.dim() == 1,
              "fastflow: seeds must be a 1-D int64 CUDA tensor");
  check_noise_counters(step_tensor.has_value() ? 0 : step, tag);  // a device step is read by the kernel
  const c10::cuda::CUDAGuard guard(seeds.device());
  const void* step_ptr = nullptr;
  int step_is_int32 = 0;
  if (step_tensor.has_value()) {
    TORCH_CHECK(step_tensor->numel() == 1 && step_tensor->device() == seeds.device(),
                "fastflow: the step tensor must be one element on ", seeds.device());
    TORCH_CHECK_TYPE(step_tensor->scalar_type() == at::kLong || step_tensor->scalar_type() == at::kInt,
                     "fastflow: the step tensor must be int64 or int32");
    step_ptr = step_tensor->data_ptr();
    step_is_int32 = step_tensor->scalar_type() == at::kInt;
  }
  std::vector<int64_t> shape{seeds.size(0)};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  at::Tensor result = at::empty(shape, seeds.options().dtype(at::kFloat));
  const at::Tensor sd = seeds.contiguous();
  const int64_t batch = seeds.size(0);
  const int64_t numel = batch > 0 ? result.numel() / batch : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(seeds.device().index()).stream();
  check_launch(launch_noise_cuda(sd.data_ptr<int64_t>(), batch, numel, step, step_ptr, step_is_int32,
                                 static_cast<uint32_t>(tag), result.data_ptr<float>(), stream),
               "noise");
  return result;
}

at::Tensor philox_cuda(const at::Tensor& counter, const at::Tensor& key, int64_t rounds) {
  TORCH_CHECK(counter.is_cuda() && key.device() == counter.device(), "fastflow: philox wants CUDA tensors");
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
              "fastflow: philox counter and key must be int64");
  TORCH_CHECK(counter.dim() >= 1 && counter.size(-1) == 4 && key.dim() >= 1 && key.size(-1) == 2 &&
                  counter.numel() / 4 == key.numel() / 2,
              "fastflow: philox wants counter [..., 4] and key [..., 2] with as many rows");
  check_philox_rounds(rounds);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor result = at::empty(counter.sizes(), counter.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(counter.device().index()).stream();
  check_launch(launch_philox_cuda(c.data_ptr<int64_t>(), k.data_ptr<int64_t>(), c.numel() / 4,
                                  static_cast<int>(rounds), result.data_ptr<int64_t>(), stream),
               "philox");
  return result;
}

TORCH_LIBRARY_IMPL(fastflow, CUDA, m) {
  m.impl("fused_step", &fused_step_cuda);
  m.impl("noise", &noise_cuda);
  m.impl("philox", &philox_cuda);
}

}  // namespace fastflow
