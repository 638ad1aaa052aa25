// Shared pieces of the standalone CUDA benchmarks (cuda_step_variants.cu,
// cuda_kernel_ab.cu): error checks, event timing, and the step inputs they fill.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <vector>

#include "fastflow_step.h"

#define CHECK(call)                                                                           \
  do {                                                                                        \
    cudaError_t e_ = (call);                                                                  \
    if (e_ != cudaSuccess) {                                                                  \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      exit(1);                                                                                \
    }                                                                                         \
  } while (0)

namespace cuda_bench {

// Exits with a plain message where no GPU can run the benchmark (no driver, a driver older
// than the toolkit, no device), instead of the first allocation's CUDA error.
inline void require_gpu(const char* program) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    fprintf(stderr, "%s: no usable CUDA GPU (%s); it times kernels on one\n", program,
            e != cudaSuccess ? cudaGetErrorString(e) : "no device found");
    exit(2);
  }
}

// Keeps the GPU busy while the host queues the timed launch, so a small kernel's time
// excludes the host's launch cost (as benchmarks/timing.py does with torch.cuda._sleep).
__global__ void spin_kernel(int64_t cycles) {
  const int64_t start = clock64();
  while (clock64() - start < cycles) {
  }
}

// Median device time (us) of fn() over `reps` launches, each timed by a pair of events
// after before() (which queues whatever should precede it: a spin, an L2 flush); three
// untimed calls first.
template <typename F, typename B>
float median_us(F&& fn, int reps, B&& before) {
  for (int i = 0; i < 3; ++i) fn();
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) CHECK(cudaEventCreate(&e));
  for (int r = 0; r < reps; ++r) {
    before();
    CHECK(cudaEventRecord(ev[2 * r]));
    fn();
    CHECK(cudaEventRecord(ev[2 * r + 1]));
  }
  CHECK(cudaDeviceSynchronize());
  std::vector<float> ms(reps);
  for (int r = 0; r < reps; ++r) CHECK(cudaEventElapsedTime(&ms[r], ev[2 * r], ev[2 * r + 1]));
  for (auto& e : ev) CHECK(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  return ms[reps / 2] * 1e3f;
}

// A float32 state and a bfloat16 model output of n elements, from a fixed LCG, in [-0.5, 0.5).
inline void fill_step_inputs(float* z, __nv_bfloat16* model_out, int64_t n) {
  std::vector<float> hz(n);
  std::vector<__nv_bfloat16> ho(n);
  uint32_t s = 12345;
  for (int64_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    hz[i] = static_cast<float>(s >> 8) * 0x1p-24f - 0.5f;
    ho[i] = __float2bfloat16(static_cast<float>(s & 0xFFFF) * 0x1p-16f - 0.5f);
  }
  CHECK(cudaMemcpy(z, hz.data(), n * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(model_out, ho.data(), n * 2, cudaMemcpyHostToDevice));
}

// A two-row float32 coefficient table (columns W, AZ, AO, CZ, CX, H0, H1, H2, CN, CIN), both rows `row`.
inline void upload_table(float* table, const float (&row)[fastflow::kNumCoefs]) {
  std::vector<float> ht(2 * fastflow::kNumCoefs);
  for (int r = 0; r < 2; ++r) std::copy(row, row + fastflow::kNumCoefs, ht.begin() + r * fastflow::kNumCoefs);
  CHECK(cudaMemcpy(table, ht.data(), ht.size() * 4, cudaMemcpyHostToDevice));
}

}  // namespace cuda_bench
