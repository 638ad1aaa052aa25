// Device time of the CUDA extension's launcher (launch_fused_step_cuda) on the step
// shapes the benchmarks time, for comparing two versions of the kernels: compiled
// once per version against that version's csrc/ (scripts/kernel_ab.sh builds and runs
// them alternately), it prints one line per case: label, case, median device time
// (us, L2 flushed before each launch) and a hash of the outputs. Versions that compute
// the same numbers print the same hashes. Standalone (no torch), on one GPU:
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc benchmarks/cuda_kernel_ab.cu -o /tmp/ab && /tmp/ab label
//
// Cases: 4 samples of 16x21x90x160 (19.4M elements), float32 state, bfloat16 model
// output, in-kernel noise unless noted: DDIM (no noise), DDPM, DDPM writing the next
// model input (bfloat16) or x_hat (float32), guided DDPM, DDPM with clipping, SDE-DPM++ 2M
// (a stored prediction, x_hat), DPM++ 2M (the same without noise), and DDPM on samples
// of 5 elements fewer with vector accesses off (the scalar path).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>

#include <vector>

#include "cuda_bench.h"
#include "fastflow_step.h"
#include "step_kernel.cu"  // the extension's kernels and launcher

namespace {

using fastflow::StepParams;

// Touches a buffer larger than L2, so each timed launch reads its inputs from memory.
__global__ void flush_kernel(int* buf, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) buf[i] += 1;
}

// Median device time of fn() with L2 flushed before each launch.
template <typename F>
float median_us(F&& fn, int* flush, int64_t flush_n, int reps) {
  return cuda_bench::median_us(fn, reps, [&] {
    flush_kernel<<<1024, 256>>>(flush, flush_n);
    cuda_bench::spin_kernel<<<1, 1>>>(20000);  // the launch below is queued before the GPU gets to it
  });
}

// FNV-1a over the 32-bit words of a device buffer.
uint64_t hash_words(const void* data, int64_t bytes) {
  std::vector<uint32_t> h(bytes / 4);
  CHECK(cudaMemcpy(h.data(), data, bytes, cudaMemcpyDeviceToHost));
  uint64_t x = 1469598103934665603ull;
  for (uint32_t w : h) {
    x ^= w;
    x *= 1099511628211ull;
  }
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  const char* label = argc > 1 ? argv[1] : "kernels";
  cuda_bench::require_gpu("cuda_kernel_ab");
  const int64_t batch = 4, numel = 16LL * 21 * 90 * 160, n = batch * numel;
  const int64_t flush_n = 64LL << 20;  // 256 MiB
  float *z, *out, *hist, *x_hat, *table;
  __nv_bfloat16 *model_out, *uncond, *model_in;
  int64_t* seeds;
  int* flush;
  CHECK(cudaMalloc(&z, n * 4));
  CHECK(cudaMalloc(&out, n * 4));
  CHECK(cudaMalloc(&hist, n * 4));
  CHECK(cudaMalloc(&x_hat, n * 4));
  CHECK(cudaMalloc(&model_out, n * 2));
  CHECK(cudaMalloc(&uncond, n * 2));
  CHECK(cudaMalloc(&model_in, n * 2));
  CHECK(cudaMalloc(&flush, flush_n * 4));
  CHECK(cudaMalloc(&table, 2 * fastflow::kNumCoefs * 4));
  CHECK(cudaMalloc(&seeds, batch * 8));
  {
    cuda_bench::fill_step_inputs(z, model_out, n);
    CHECK(cudaMemcpy(hist, z, n * 4, cudaMemcpyDeviceToDevice));
    CHECK(cudaMemcpy(uncond, model_out, n * 2, cudaMemcpyDeviceToDevice));
    const float row[fastflow::kNumCoefs] = {1.5f, 0.9f, -0.3f, 0.7f, 0.2f, 0.5f, 0.0f, 0.0f, 0.1f, 1.0f};
    cuda_bench::upload_table(table, row);
    const int64_t hs[4] = {1, 2, static_cast<int64_t>(0x9E3779B97F4A7C15ull), 4};  // one seed past 2**63
    CHECK(cudaMemcpy(seeds, hs, sizeof hs, cudaMemcpyHostToDevice));
  }
  StepParams p;
  p.z = z;
  p.out = out;
  p.model_out = model_out;
  p.model_out_dtype = fastflow::kBFloat16;
  p.seeds = seeds;
  p.table = table;
  p.table_rows = 2;
  p.step = 1;
  p.batch = batch;
  p.numel = numel;
  p.vectorized = 1;

  struct Case {
    const char* name;
    StepParams q;
  };
  std::vector<Case> cases;
  StepParams q = p;
  cases.push_back({"ddim", q});
  q.use_noise = 1;
  cases.push_back({"ddpm", q});
  q.model_in_out = model_in;
  q.model_in_dtype = fastflow::kBFloat16;
  cases.push_back({"ddpm, model input", q});
  q.model_in_out = nullptr;
  q.x_out = x_hat;
  cases.push_back({"ddpm, x_hat", q});
  q.x_out = nullptr;
  q.model_out_uncond = uncond;
  q.uncond_dtype = fastflow::kBFloat16;
  cases.push_back({"guided ddpm", q});
  q.model_out_uncond = nullptr;
  q.has_clip = 1;
  q.clip = 1.0;
  cases.push_back({"ddpm, clipped", q});
  q.has_clip = 0;
  q.num_history = 1;
  q.history[0] = hist;
  q.x_out = x_hat;
  cases.push_back({"sde-dpm++2m", q});
  q.use_noise = 0;
  cases.push_back({"dpm++2m", q});
  q = p;
  q.use_noise = 1;
  q.numel = numel - 5;
  q.vectorized = 0;
  cases.push_back({"ddpm, scalar path", q});

  for (const Case& c : cases) {
    const float us = median_us(
        [&] { CHECK(static_cast<cudaError_t>(fastflow::launch_fused_step_cuda(c.q, false, nullptr))); }, flush,
        flush_n, 40);
    CHECK(cudaDeviceSynchronize());
    uint64_t h = hash_words(out, n * 4);
    if (c.q.x_out != nullptr) h ^= hash_words(x_hat, n * 4) * 3;
    if (c.q.model_in_out != nullptr) h ^= hash_words(model_in, n * 2) * 5;
    printf("%s\t%s\t%.2f\t%016llx\n", label, c.name, us, static_cast<unsigned long long>(h));
  }
  return 0;
}
