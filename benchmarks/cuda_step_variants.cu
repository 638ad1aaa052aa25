// Device time of the CUDA step kernel's body under other launch shapes and with
// its runtime switches fixed at compile time: which of the two a slower kernel
// lacks. Standalone (no torch), on one GPU:
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc benchmarks/cuda_step_variants.cu -o /tmp/variants && /tmp/variants
//
// Every variant runs the extension kernel's code (pin_launch_invariants, then
// fused_step_items, csrc/step_kernel_body.h), on 4 x 16x21x90x160 elements: float32 state, bfloat16
// model output, a float32 coefficient table, no history, with and without in-kernel
// noise, in two configurations: no other output (the benchmark's ddim and ddpm device
// cases) and the next model input written in bfloat16 (what a sampling loop asks for).
// Variants (threads per block, items per thread, and switches fixed at compile time):
//   256 x 1        the extension's launch before dfec2b6: 256 threads, one item per thread
//   extension      the extension's grid (step_grid in csrc/step_kernel_body.h)
//   items x K      each thread loops over K items (a grid K times smaller)
//   128 threads    blocks of 128 threads
//   <switch> fixed the extension's shape with one group of runtime switches made a
//                  compile-time constant: the storage dtypes; guidance (none); history
//                  (none); noise (drawn or none, never explicit: since 333bfe7 the
//                  drawing kernel pins this itself); outputs (no x_hat, no
//                  model input, or the one model input of the second configuration); the
//                  rest (no clip, vector path, host step index)
//   options fixed  every switch but the dtypes a constant
//   all fixed      every switch a constant (the Triton kernel's specialization)
//   launcher       the extension's own launch (launch_fused_step_cuda): the
//                  compile-time plan that matches the launch (csrc/step_plans.h:
//                  DrawPlans when drawing, else DtypePlans)
// A second table times the drawing kernel's generic form against the launcher's plan
// for each set of outputs (x_hat, next model input), and checks they give the same z.
// A third table times guided steps that draw noise in the generic kernel against the
// launcher's plan (the guided DrawPlans).
// A fourth table times a small step, (1,16,128,128) with the model input written
// and the step index read from the device (as a captured loop does), where the
// kernel's prologue (step index, coefficient row) is most of its time.
// Prints the median over repetitions of each variant's device time, and its share
// of the device-to-device copy bandwidth at the step's least traffic (10 bytes per
// element, 12 with the model input). Each variant's output is compared with the
// 256 x 1 launch's.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <vector>

#include "cuda_bench.h"
#include "fastflow_step.h"
#include "step_kernel.cu"  // the extension's kernels and launcher, for the "launcher" rows
#include "step_kernel_body.h"

using fastflow::StepParams;

namespace {

constexpr int kMaxThreads = 256;

enum Fix : int {
  kFixDtypes = 1,
  kFixGuide = 2,
  kFixHistory = 4,
  kFixNoise = 8,
  kFixOutputs = 16,
  kFixRest = 32,
  kFixAll = 63,
  kFixOptions = kFixAll & ~kFixDtypes,
  kFixDataOptions = kFixGuide | kFixHistory | kFixNoise | kFixOutputs,  // the step index stays on the device
  kLauncher = 128,  // not a variant: the extension's launcher, launch_fused_step_cuda (its plan for the launch)
};

template <bool kDraw, int kFix, bool kModelIn>
__global__ void __launch_bounds__(kMaxThreads) variant_kernel(StepParams p, int64_t ips) {
  fastflow::pin_launch_invariants<float, kDraw>(p);  // as fused_step_kernel
  if (kFix & kFixDtypes) {
    p.z_dtype = fastflow::kFloat32;
    p.model_out_dtype = fastflow::kBFloat16;
    p.uncond_dtype = fastflow::kBFloat16;
    p.noise_dtype = fastflow::kFloat32;
    p.x_out_dtype = fastflow::kFloat32;
    p.model_in_dtype = fastflow::kBFloat16;
    p.table_dtype = fastflow::kFloat32;
    for (int j = 0; j < fastflow::kMaxHistory; ++j) p.history_dtype[j] = fastflow::kFloat32;
  }
  if (kFix & kFixGuide) p.model_out_uncond = nullptr;
  if (kFix & kFixHistory) p.num_history = 0;
  if (kFix & kFixNoise) {
    p.use_noise = kDraw;
    p.noise = nullptr;
  }
  if (kFix & kFixOutputs) {
    p.x_out = nullptr;
    p.model_in_double = 0;
    if constexpr (kModelIn) {
      __builtin_assume(p.model_in_out != nullptr);
    } else {
      p.model_in_out = nullptr;
    }
  }
  if (kFix & kFixRest) {
    p.has_clip = 0;
    p.vectorized = 1;
    p.step_ptr = nullptr;
  }
  fastflow::fused_step_items<float, kDraw, fastflow::GenericPlan>(
      p, ips, blockIdx.y, gridDim.y, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
      static_cast<int64_t>(gridDim.x) * blockDim.x);
}

struct Variant {
  const char* name;
  int fix;               // Fix bits
  int threads;           // 0: the extension's grid
  int items_per_thread;  // with threads > 0
};

template <bool kDraw, int kFix>
void run_fixed(dim3 grid, int threads, const StepParams& p, int64_t ips) {
  if (p.model_in_out != nullptr) {
    variant_kernel<kDraw, kFix, true><<<grid, threads>>>(p, ips);
  } else {
    variant_kernel<kDraw, kFix, false><<<grid, threads>>>(p, ips);
  }
}

template <bool kDraw>
void launch(const Variant& v, const StepParams& p) {
  if (v.fix == kLauncher) {
    CHECK(static_cast<cudaError_t>(fastflow::launch_fused_step_cuda(p, false, nullptr)));
    return;
  }
  const int64_t ips = fastflow::items_per_sample<float, kDraw, fastflow::GenericPlan>(p);
  // threads 0: the extension's grid (step_grid, csrc/step_kernel_body.h).
  const fastflow::StepGrid ext = fastflow::step_grid<float, kDraw, fastflow::GenericPlan>(p);
  const int threads = v.threads > 0 ? v.threads : static_cast<int>(ext.threads);
  const int64_t per_block = static_cast<int64_t>(threads) * v.items_per_thread;
  const dim3 grid(static_cast<unsigned>(v.threads > 0 ? (ips + per_block - 1) / per_block : ext.blocks_x),
                  static_cast<unsigned>(p.batch));
  switch (v.fix) {
    case 0: return run_fixed<kDraw, 0>(grid, threads, p, ips);
    case kFixDtypes: return run_fixed<kDraw, kFixDtypes>(grid, threads, p, ips);
    case kFixGuide: return run_fixed<kDraw, kFixGuide>(grid, threads, p, ips);
    case kFixHistory: return run_fixed<kDraw, kFixHistory>(grid, threads, p, ips);
    case kFixNoise: return run_fixed<kDraw, kFixNoise>(grid, threads, p, ips);
    case kFixOutputs: return run_fixed<kDraw, kFixOutputs>(grid, threads, p, ips);
    case kFixRest: return run_fixed<kDraw, kFixRest>(grid, threads, p, ips);
    case kFixOptions: return run_fixed<kDraw, kFixOptions>(grid, threads, p, ips);
    case kFixDataOptions: return run_fixed<kDraw, kFixDataOptions>(grid, threads, p, ips);
    case kFixAll: return run_fixed<kDraw, kFixAll>(grid, threads, p, ips);
    default: fprintf(stderr, "unknown variant\n"); exit(1);
  }
}

template <typename F>
float median_us(F&& fn, int reps) {
  return cuda_bench::median_us(fn, reps, [] { cuda_bench::spin_kernel<<<1, 1>>>(100000); });
}

// Median device time of variant v's launch on p (drawing noise when p asks for it), launch errors checked.
float time_variant(const Variant& v, const StepParams& p, int reps) {
  const float us = median_us([&] { p.use_noise ? launch<true>(v, p) : launch<false>(v, p); }, reps);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  return us;
}

// The largest |a - b| over n float32 elements on the device.
float max_abs_diff(const float* a, const float* b, int64_t n) {
  std::vector<float> ha(n), hb(n);
  CHECK(cudaMemcpy(ha.data(), a, n * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hb.data(), b, n * 4, cudaMemcpyDeviceToHost));
  float diff = 0.0f;
  for (int64_t i = 0; i < n; ++i) diff = std::max(diff, std::abs(ha[i] - hb[i]));
  return diff;
}

}  // namespace

int main() {
  cuda_bench::require_gpu("cuda_step_variants");
  const int64_t batch = 4, numel = 16LL * 21 * 90 * 160, n = batch * numel;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));

  float *z, *out, *ref;
  __nv_bfloat16* model_out;
  float* table;
  int64_t* seeds;
  CHECK(cudaMalloc(&z, n * 4));
  CHECK(cudaMalloc(&out, n * 4));
  CHECK(cudaMalloc(&ref, n * 4));
  CHECK(cudaMalloc(&model_out, n * 2));
  CHECK(cudaMalloc(&table, 2 * fastflow::kNumCoefs * 4));
  CHECK(cudaMalloc(&seeds, batch * 8));
  {
    cuda_bench::fill_step_inputs(z, model_out, n);
    const float row[fastflow::kNumCoefs] = {1.0f, 0.9f, -0.3f, 0.7f, 0.2f, 0.0f, 0.0f, 0.0f, 0.1f, 1.0f};
    cuda_bench::upload_table(table, row);
    const int64_t hs[4] = {1, 2, 3, 4};
    CHECK(cudaMemcpy(seeds, hs, sizeof hs, cudaMemcpyHostToDevice));
  }

  // Copy bandwidth (read + write), 512 MiB.
  const size_t copy_bytes = 512ull << 20;
  void *ca, *cb;
  CHECK(cudaMalloc(&ca, copy_bytes));
  CHECK(cudaMalloc(&cb, copy_bytes));
  CHECK(cudaMemset(ca, 0, copy_bytes));
  const float copy_us = median_us([&] { CHECK(cudaMemcpyAsync(cb, ca, copy_bytes, cudaMemcpyDeviceToDevice)); }, 20);
  const double copy_gbs = 2.0 * copy_bytes / (copy_us * 1e-6) / 1e9;
  CHECK(cudaFree(ca));
  CHECK(cudaFree(cb));
  printf("device: %s (%d SMs); copy bandwidth %.0f GB/s\n", prop.name, prop.multiProcessorCount, copy_gbs);
  printf("%d elements: float32 state, bfloat16 model output; floor %.2f us at 10 bytes per element\n\n",
         static_cast<int>(n), 10.0 * n / (copy_gbs * 1e3));

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

  const Variant variants[] = {
      {"256 x 1", 0, 256, 1},          {"extension", 0, 0, 0},          {"items x 2", 0, 256, 2},
      {"items x 4", 0, 256, 4},        {"128 threads", 0, 128, 1},      {"dtypes fixed", kFixDtypes, 0, 0},
      {"guidance fixed", kFixGuide, 0, 0}, {"history fixed", kFixHistory, 0, 0}, {"noise fixed", kFixNoise, 0, 0},
      {"outputs fixed", kFixOutputs, 0, 0}, {"rest fixed", kFixRest, 0, 0},  {"options fixed", kFixOptions, 0, 0},
      {"all fixed", kFixAll, 0, 0},        {"launcher", kLauncher, 0, 0},
  };
  __nv_bfloat16* model_in;
  CHECK(cudaMalloc(&model_in, n * 2));
  printf("| output | noise | variant | us | share of copy bandwidth | max abs diff to 256 x 1 |\n"
         "|---|---|---|---|---|---|\n");
  for (int with_model_in = 0; with_model_in < 2; ++with_model_in) {
    p.model_in_out = with_model_in ? model_in : nullptr;
    p.model_in_dtype = fastflow::kBFloat16;
    const double bytes = (with_model_in ? 12.0 : 10.0) * n;
    for (int draw = 0; draw < 2; ++draw) {
      p.use_noise = draw;
      for (const Variant& v : variants) {
        const float us = time_variant(v, p, 30);
        if (&v == &variants[0]) {
          CHECK(cudaMemcpy(ref, out, n * 4, cudaMemcpyDeviceToDevice));
        }
        const float diff = max_abs_diff(out, ref, n);
        printf("| %s | %s | %s | %.1f | %.0f%% | %g |\n", with_model_in ? "z, model input" : "z",
               draw ? "drawn" : "none", v.name, us, 100.0 * bytes / (us * 1e-6) / 1e9 / copy_gbs, diff);
      }
    }
  }
  // The drawing kernel's plans against its generic form, per set of outputs.
  {
    float* x_hat;
    CHECK(cudaMalloc(&x_hat, n * 4));
    const Variant generic = {"extension", 0, 0, 0}, launcher = {"launcher", kLauncher, 0, 0};
    printf("\nDrawing noise, per set of outputs (x_hat in float32, model input in bfloat16): the generic kernel"
           " against the launcher's plan (us, median)\n\n| outputs | generic | launcher | launcher / generic |"
           " max abs diff |\n|---|---|---|---|---|\n");
    StepParams q = p;
    q.use_noise = 1;
    for (int outputs = 0; outputs < 4; ++outputs) {
      q.x_out = (outputs & 1) ? x_hat : nullptr;
      q.model_in_out = (outputs & 2) ? model_in : nullptr;
      const float g = time_variant(generic, q, 30);
      CHECK(cudaMemcpy(ref, out, n * 4, cudaMemcpyDeviceToDevice));
      const float l = time_variant(launcher, q, 30);
      printf("| z%s%s | %.1f | %.1f | %.2f | %g |\n", (outputs & 1) ? ", x_hat" : "",
             (outputs & 2) ? ", model input" : "", g, l, l / g, max_abs_diff(out, ref, n));
    }
    CHECK(cudaFree(x_hat));
  }
  // Guided drawing steps: the generic kernel against the launcher's plan.
  {
    __nv_bfloat16 *uncond, *model_in2;
    CHECK(cudaMalloc(&uncond, n * 2));
    CHECK(cudaMalloc(&model_in2, 2 * n * 2));
    CHECK(cudaMemcpy(uncond, model_out, n * 2, cudaMemcpyDeviceToDevice));
    const Variant generic = {"extension", 0, 0, 0}, launcher = {"launcher", kLauncher, 0, 0};
    printf("\nGuided steps drawing noise (float32 state, bfloat16 model outputs): the generic kernel against the"
           " launcher's plan (us, median)\n\n| outputs | generic | launcher | launcher / generic |"
           " max abs diff |\n|---|---|---|---|---|\n");
    StepParams q = p;
    q.use_noise = 1;
    q.model_out_uncond = uncond;
    q.uncond_dtype = fastflow::kBFloat16;
    for (int with_model_in = 0; with_model_in < 2; ++with_model_in) {
      q.model_in_out = with_model_in ? model_in2 : nullptr;
      q.model_in_dtype = fastflow::kBFloat16;
      q.model_in_double = with_model_in;
      const float g = time_variant(generic, q, 30);
      CHECK(cudaMemcpy(ref, out, n * 4, cudaMemcpyDeviceToDevice));
      const float l = time_variant(launcher, q, 30);
      printf("| z%s | %.1f | %.1f | %.2f | %g |\n", with_model_in ? ", doubled model input" : "", g, l, l / g,
             max_abs_diff(out, ref, n));
    }
    CHECK(cudaFree(uncond));
    CHECK(cudaFree(model_in2));
  }
  // A small step in graph mode: the step index read from the device, the model input written.
  {
    const int64_t small = 16 * 128 * 128;
    int64_t* step_dev;
    CHECK(cudaMalloc(&step_dev, 8));
    const int64_t one = 1;
    CHECK(cudaMemcpy(step_dev, &one, 8, cudaMemcpyHostToDevice));
    StepParams q = p;
    q.batch = 1;
    q.numel = small;
    q.step_ptr = step_dev;
    q.model_in_out = model_in;
    const Variant small_variants[] = {
        {"extension", 0, 0, 0}, {"dtypes fixed", kFixDtypes, 0, 0},
        {"guidance, history, noise and outputs fixed", kFixDataOptions, 0, 0}, {"launcher", kLauncher, 0, 0},
    };
    printf("\n%d elements, model input written, step index on the device (us, median; L2 not flushed):\n\n",
           static_cast<int>(small));
    printf("| noise | variant | us |\n|---|---|---|\n");
    for (int draw = 0; draw < 2; ++draw) {
      q.use_noise = draw;
      for (const Variant& v : small_variants) {
        const float us = time_variant(v, q, 200);
        printf("| %s | %s | %.2f |\n", draw ? "drawn" : "none", v.name, us);
      }
    }
  }
  return 0;
}
