// CUDA kernels of fastflow: one pass per step-plan stage, plus the noise and raw
// Philox kernels used for initial noise and tests.
//
// Light includes only (no torch): this file compiles with plain
// `nvcc -arch=sm_90 -c csrc/step_kernel.cu`.
//
// Work item = 8 consecutive elements of one sample, or, where the kernel draws noise
// in float32, 8 or 4 as its plan sets (kItemWidth; the start is a multiple of the
// width, so an item holds whole Philox groups of 4: one Philox call serves 4
// elements). When every pointer and every sample start is 16-byte aligned, a full
// item is moved with vector loads and stores (16 bytes, 8 for four 16-bit elements); the last item of
// a sample and unaligned tensors use scalar accesses. Indexing is int64 throughout.
// The coefficient row and the step index are read on the device, so a launch needs
// no host-side value and is safe to capture in a CUDA graph. The step's grid is
// 2-D, items of a sample by samples, as the Triton kernel's: a block's sample is
// uniform (its shape: step_grid in step_kernel_body.h). Dtypes and options are
// launch parameters (warp-uniform switches) of three generic kernels, which serve
// every dtype mix: float compute with and without in-kernel noise (its item width
// is its plan's: 4 for the generic kernel, register counts in
// scripts/check_cuda_compile.sh), and double compute. The common launches run
// compile-time plans of the float kernels instead, which fix some of those switches
// (DrawPlans and DtypePlans in step_plans.h).
#include <cuda_runtime.h>

#include "fastflow_cuda.h"
#include "fastflow_step.h"
#include "step_kernel_body.h"
#include "step_plans.h"

namespace fastflow {
namespace {

constexpr int kThreads = 256;  // the most threads a block of these kernels has
static_assert(LaunchShape<true, 4>::threads <= kThreads && LaunchShape<true, 8>::threads <= kThreads &&
                  LaunchShape<false, 8>::threads <= kThreads,
              "step_grid's blocks must fit the kernels' launch bounds");

// Grid: x over a sample's items, y over samples (each loop strides past the grid).
// Plan: GenericPlan, or a DrawPlan or DtypePlan the launch matches (step_plans.h).
template <typename T, bool kDraw, typename Plan>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(StepParams p, int64_t items_per_sample) {
  pin_launch_invariants<T, kDraw>(p);
  Plan::pin(p);
  fused_step_items<T, kDraw, Plan>(p, items_per_sample, blockIdx.y, gridDim.y,
                             static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                             static_cast<int64_t>(gridDim.x) * blockDim.x);
}

__global__ void __launch_bounds__(kThreads)
    noise_kernel(const int64_t* seeds, int64_t groups, int64_t batch, int64_t numel, int64_t step,
                 const void* step_ptr, int step_is_int32, uint32_t tag, float* out) {
  const int64_t total = batch * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= total) return;
  if (step_ptr != nullptr) {
    step = step_is_int32 ? static_cast<int64_t>(*static_cast<const int32_t*>(step_ptr))
                         : *static_cast<const int64_t*>(step_ptr);
  }
  const uint32_t step32 = static_cast<uint32_t>(step);
  const bool vec = (numel & 3) == 0 && (reinterpret_cast<uintptr_t>(out) & 15u) == 0;
  for (; item < total; item += stride) {
    const int64_t b = item / groups;
    const int64_t g = item - b * groups;
    float v[4];
    words_to_normals(noise_words(static_cast<uint64_t>(seeds[b]), static_cast<uint64_t>(g), step32, tag), v);
    float* dst = out + b * numel + 4 * g;
    if (vec) {
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      const int64_t n = numel - 4 * g < 4 ? numel - 4 * g : 4;
      for (int64_t j = 0; j < n; ++j) dst[j] = v[j];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    philox_kernel(const int64_t* counter, const int64_t* key, int64_t rows, int rounds, int64_t* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows; i += stride) {
    const Words4 w = philox4x32(static_cast<uint32_t>(counter[4 * i]), static_cast<uint32_t>(counter[4 * i + 1]),
                                static_cast<uint32_t>(counter[4 * i + 2]), static_cast<uint32_t>(counter[4 * i + 3]),
                                static_cast<uint32_t>(key[2 * i]), static_cast<uint32_t>(key[2 * i + 1]), rounds);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<int64_t>(w.x[j]);
  }
}

unsigned int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  const int64_t cap = 0x7FFFFFFF;  // the kernels loop over the rest
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

template <typename T, bool kDraw, typename Plan>
void launch_with_plan(const StepParams& p, cudaStream_t s) {
  const StepGrid g = step_grid<T, kDraw, Plan>(p);
  if (g.blocks_x == 0) return;
  const dim3 grid(static_cast<unsigned int>(g.blocks_x), static_cast<unsigned int>(g.rows));
  fused_step_kernel<T, kDraw, Plan>
      <<<grid, static_cast<unsigned int>(g.threads), 0, s>>>(p, items_per_sample<T, kDraw, Plan>(p));
}

// Instantiation <T, kDraw> in the plan that matches the launch (step_plans.h).
template <typename T, bool kDraw>
void launch_fused_step(const StepParams& p, cudaStream_t s) {
  with_launch_plan<T, kDraw>(p, [&](auto plan) { launch_with_plan<T, kDraw, decltype(plan)>(p, s); });
}

}  // namespace

int launch_fused_step_cuda(const StepParams& p, bool compute_double, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (compute_double) {  // rare (float64 state): one instantiation serves every launch
    launch_fused_step<double, true>(p, s);
  } else if (draws_noise(p)) {
    launch_fused_step<float, true>(p, s);
  } else {
    launch_fused_step<float, false>(p, s);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_noise_cuda(const int64_t* seeds, int64_t batch, int64_t numel, int64_t step, const void* step_ptr,
                      int step_is_int32, uint32_t tag, float* out, void* stream) {
  const int64_t groups = (numel + 3) / 4;
  if (batch * groups == 0) return 0;
  noise_kernel<<<grid_for(batch * groups), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      seeds, groups, batch, numel, step, step_ptr, step_is_int32, tag, out);
  return static_cast<int>(cudaGetLastError());
}

int launch_philox_cuda(const int64_t* counter, const int64_t* key, int64_t rows, int rounds, int64_t* out,
                       void* stream) {
  if (rows == 0) return 0;
  philox_kernel<<<grid_for(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(counter, key, rows, rounds, out);
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace fastflow
