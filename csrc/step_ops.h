// The at::Tensor-facing operator implementations, declared for the registration
// and the direct Python binding in ops.cpp. CPU ones live in step_cpu.cpp, CUDA
// ones in step_cuda.cpp (only in builds with CUDA, where FASTFLOW_WITH_CUDA is set).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "step_host.h"

namespace fastflow {

// A prepared stage (step_host.h) run on the CPU, or on the CUDA device of its
// tensors, `device`, on its current stream (the caller holds a device guard for it,
// as around prepare_step, whose contiguous copies need it too).
void run_prepared_cpu(PreparedStep& s);

void fused_step_cpu(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
                    const std::optional<at::Tensor>& model_out_uncond, at::TensorList history, const at::Tensor& table,
                    int64_t step, const std::optional<at::Tensor>& step_tensor, const std::optional<at::Tensor>& seeds,
                    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& x_out,
                    const std::optional<at::Tensor>& model_in_out, std::optional<double> clip, bool use_noise);
at::Tensor noise_cpu(const at::Tensor& seeds, at::IntArrayRef sample_shape, int64_t step,
                     const std::optional<at::Tensor>& step_tensor, int64_t tag);
at::Tensor philox_cpu(const at::Tensor& counter, const at::Tensor& key, int64_t rounds);

#if defined(FASTFLOW_WITH_CUDA)
void run_prepared_cuda(PreparedStep& s, c10::Device device);
void fused_step_cuda(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
                     const std::optional<at::Tensor>& model_out_uncond, at::TensorList history, const at::Tensor& table,
                     int64_t step, const std::optional<at::Tensor>& step_tensor, const std::optional<at::Tensor>& seeds,
                     const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& x_out,
                     const std::optional<at::Tensor>& model_in_out, std::optional<double> clip, bool use_noise);
at::Tensor noise_cuda(const at::Tensor& seeds, at::IntArrayRef sample_shape, int64_t step,
                      const std::optional<at::Tensor>& step_tensor, int64_t tag);
at::Tensor philox_cuda(const at::Tensor& counter, const at::Tensor& key, int64_t rounds);
#endif

}  // namespace fastflow
