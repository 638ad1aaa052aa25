// Launchers of the CUDA kernels in step_kernel.cu: plain C++ declarations, no
// torch and no CUDA headers, so the at::Tensor-facing code and the kernels build
// separately. `stream` is a cudaStream_t. Each returns the cudaError_t of its
// launch as an int (0: success).
#pragma once

#include <stdint.h>

#include "fastflow_step.h"

namespace fastflow {

// One stage of a step plan; `compute_double` selects float64 arithmetic.
int launch_fused_step_cuda(const StepParams& p, bool compute_double, void* stream);

// Noise of the spec, float32 [batch, numel]; the step is read from `step_ptr` when
// it is not null (int32 when `step_is_int32`, else int64), else `step` is used.
int launch_noise_cuda(const int64_t* seeds, int64_t batch, int64_t numel, int64_t step, const void* step_ptr,
                      int step_is_int32, uint32_t tag, float* out, void* stream);

// Raw Philox4x32 words for `rows` counters [rows, 4] and keys [rows, 2] (int64 holding uint32).
int launch_philox_cuda(const int64_t* counter, const int64_t* key, int64_t rows, int rounds, int64_t* out,
                       void* stream);

// The message of an error code returned above.
const char* cuda_error_string(int code);

}  // namespace fastflow
