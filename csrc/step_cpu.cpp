// CPU implementation of the fastflow operators: the header's per-element math in
// a plain C++ loop, threaded with at::parallel_for.
//
// Work is split into blocks of one sample (a multiple of 4 elements, so one Philox
// call serves 4 elements and a sample's noise never depends on the split). Each
// block is converted to the compute type, evaluated, and converted back, so the
// dtype switches run once per block rather than once per element.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu_features.h"
#include "fastflow_step.h"
#include "half_x86.h"
#include "noise_avx2.h"
#include "step_host.h"
#include "step_ops.h"

namespace fastflow {
namespace {

constexpr int64_t kBlock = 512;  // elements per block (multiple of 4)
// Elements per thread's task, at least: a plain step costs about 1 ns an element, so a task of fewer is not
// worth a thread; drawing noise costs several times that (noise_avx2.h, or libm's), so a drawing step splits
// finer.
constexpr int64_t kGrainElements = 32768;
constexpr int64_t kDrawGrainElements = 4096;

// Items (the `blocks` blocks of one sample of `numel` elements) per task of at least `elements` elements, counted
// by the items' mean size: a sample smaller than a block (a batch of 2-D points) makes items of its own size.
// Counting kBlock for each split a batch of 2,000 points over threads at 128 elements a task, and a parallel region
// that small took milliseconds a step where its threads had to wait for a loaded machine's cores (the demo's steps:
// 7 ms against 0.09). Such a batch's steps cost more than their elements say (about 20 ns an item against 1.6 an
// element, one thread), but they are left on one thread, as torch leaves its own ops on that many elements.
int64_t grain_items(int64_t elements, int64_t numel, int64_t blocks) {
  const int64_t item_elements = (numel + blocks - 1) / std::max<int64_t>(1, blocks);
  return std::max<int64_t>(1, elements / std::max<int64_t>(1, item_elements));
}

// float16 and bfloat16 blocks in float, eight elements at a time where the CPU has the instructions (half_x86.h);
// false where it has not (or the type is double), and the caller converts one element at a time.
template <typename T>
bool load_16_bit_fast(const void* base, int dtype, int64_t off, int64_t n, T* dst) {
#if defined(FASTFLOW_HALF_X86)
  if constexpr (std::is_same_v<T, float>) {
    const uint16_t* src = static_cast<const uint16_t*>(base) + off;
    if (dtype == kFloat16 && cpu::has_f16c()) {
      half_x86::half_to_float(src, n, dst);
      return true;
    }
    if (dtype == kBFloat16 && cpu::has_avx2()) {
      half_x86::bf16_to_float(src, n, dst);
      return true;
    }
  }
#endif
  return false;
}

template <typename T>
bool store_16_bit_fast(void* base, int dtype, int64_t off, int64_t n, const T* src) {
#if defined(FASTFLOW_HALF_X86)
  if constexpr (std::is_same_v<T, float>) {
    uint16_t* dst = static_cast<uint16_t*>(base) + off;
    if (dtype == kFloat16 && cpu::has_f16c()) {
      half_x86::float_to_half(src, n, dst);
      return true;
    }
    if (dtype == kBFloat16 && cpu::has_avx2()) {
      half_x86::float_to_bf16(src, n, dst);
      return true;
    }
  }
#endif
  return false;
}

template <typename T>
void load_block(const void* base, int dtype, int64_t off, int64_t n, T* dst) {
  if (load_16_bit_fast(base, dtype, off, n, dst)) return;
  switch (dtype) {
    case kFloat32: {
      const float* s = static_cast<const float*>(base) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(s[i]);
      break;
    }
    case kFloat16: {
      const c10::Half* s = static_cast<const c10::Half*>(base) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<float>(s[i]));
      break;
    }
    case kBFloat16: {
      const c10::BFloat16* s = static_cast<const c10::BFloat16*>(base) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<float>(s[i]));
      break;
    }
    default: {
      const double* s = static_cast<const double*>(base) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(s[i]);
      break;
    }
  }
}

// Rounds once to the storage type (half types from double go through float, as torch's own copy does).
template <typename T>
void store_block(void* base, int dtype, int64_t off, int64_t n, const T* src) {
  if (store_16_bit_fast(base, dtype, off, n, src)) return;
  switch (dtype) {
    case kFloat32: {
      float* d = static_cast<float*>(base) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(src[i]);
      break;
    }
    case kFloat16: {
      c10::Half* d = static_cast<c10::Half*>(base) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(static_cast<float>(src[i]));
      break;
    }
    case kBFloat16: {
      c10::BFloat16* d = static_cast<c10::BFloat16*>(base) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = c10::BFloat16(static_cast<float>(src[i]));
      break;
    }
    default: {
      double* d = static_cast<double*>(base) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(src[i]);
      break;
    }
  }
}

// Noise of elements [e0, e0 + n) of a sample; e0 is a multiple of 4. Float normals 16 at a time with AVX2 where
// the CPU has it (noise_avx2.h: the same values), the rest one group at a time.
template <typename T>
void draw_block(uint64_t seed, int64_t e0, int64_t n, uint32_t step, uint32_t tag, T* dst) {
  int64_t i = 0;
#if defined(FASTFLOW_AVX2_NOISE)
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::has_avx2()) {
      const int64_t chunks = n / 16;
      avx2::draw_normals(seed, e0, chunks, step, tag, dst);
      i = 16 * chunks;
    }
  }
#endif
  for (; i < n; i += 4) {
    T v[4];
    words_to_normals(noise_words(seed, static_cast<uint64_t>((e0 + i) >> 2), step, tag), v);
    const int64_t m = std::min<int64_t>(4, n - i);
    for (int64_t j = 0; j < m; ++j) dst[i + j] = v[j];
  }
}

template <typename T>
void run_step(const StepParams& p) {
  const int64_t step = load_step_index(p);
  const Coefs<T> k = load_coefs<T>(p, step);
  const uint32_t step32 = static_cast<uint32_t>(step);
  const T clip = static_cast<T>(p.clip);
  const bool guided = p.model_out_uncond != nullptr;
  const bool has_clip = p.has_clip != 0;
  const int64_t blocks = (p.numel + kBlock - 1) / kBlock;
  const int64_t total = p.batch * blocks;
  const bool draws = p.use_noise && p.noise == nullptr;
  const int64_t grain = grain_items(draws ? kDrawGrainElements : kGrainElements, p.numel, blocks);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    T z[kBlock], o[kBlock], ou[kBlock], h[kMaxHistory][kBlock], xi[kBlock], x[kBlock], zn[kBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks;
      const int64_t e0 = (item - b * blocks) * kBlock;
      const int64_t n = std::min(kBlock, p.numel - e0);
      const int64_t off = b * p.numel + e0;
      load_block(p.z, p.z_dtype, off, n, z);
      load_block(p.model_out, p.model_out_dtype, off, n, o);
      if (guided) load_block(p.model_out_uncond, p.uncond_dtype, off, n, ou);
      for (int j = 0; j < p.num_history; ++j) load_block(p.history[j], p.history_dtype[j], off, n, h[j]);
      if (p.use_noise) {
        if (p.noise != nullptr) {
          load_block(p.noise, p.noise_dtype, off, n, xi);
        } else {
          draw_block(static_cast<uint64_t>(p.seeds[b]), e0, n, step32, kStepTag, xi);
        }
      }
      // The plan as passes over the block, one operation at a time in eval_plan's order (so the
      // result is eval_plan's, bit for bit), with no branch inside a pass: each one vectorizes.
      if (guided) {
        for (int64_t i = 0; i < n; ++i) o[i] = guide(k, o[i], ou[i]);
      }
      if (has_clip) {
        for (int64_t i = 0; i < n; ++i) x[i] = data_prediction(k, z[i], o[i], true, clip);
      } else {
        for (int64_t i = 0; i < n; ++i) x[i] = data_prediction(k, z[i], o[i], false, clip);
      }
      for (int64_t i = 0; i < n; ++i) zn[i] = update_base(k, z[i], x[i]);
      for (int j = 0; j < p.num_history; ++j) {
        const T* hj = h[j];
        for (int64_t i = 0; i < n; ++i) zn[i] = add_term(k, kH0 + j, zn[i], hj[i]);
      }
      if (p.use_noise) {
        for (int64_t i = 0; i < n; ++i) zn[i] = add_term(k, kCN, zn[i], xi[i]);
      }
      if (p.x_out != nullptr) store_block(p.x_out, p.x_out_dtype, off, n, x);
      if (p.model_in_out != nullptr) {
        for (int64_t i = 0; i < n; ++i) x[i] = mul_rn(k.c[kCIN], zn[i]);  // x is no longer needed
        store_block(p.model_in_out, p.model_in_dtype, off, n, x);
        if (p.model_in_double) store_block(p.model_in_out, p.model_in_dtype, off + p.batch * p.numel, n, x);
      }
      store_block(p.out, p.z_dtype, off, n, zn);
    }
  });
}

}  // namespace

void fused_step_cpu(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
                    const std::optional<at::Tensor>& model_out_uncond, at::TensorList history, const at::Tensor& table,
                    int64_t step, const std::optional<at::Tensor>& step_tensor, const std::optional<at::Tensor>& seeds,
                    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& x_out,
                    const std::optional<at::Tensor>& model_in_out, std::optional<double> clip, bool use_noise) {
  TORCH_CHECK(z.device().is_cpu(), "fastflow: the CPU kernel got a tensor on ", z.device());
  refuse_overlaps(z, out, model_out, model_out_uncond, history, noise, x_out, model_in_out, use_noise);
  PreparedStep s = prepare_step(z, out, model_out, model_out_uncond, history, table, step, step_tensor, seeds, noise,
                                x_out, model_in_out, clip, use_noise);
  run_prepared_cpu(s);
}

void run_prepared_cpu(PreparedStep& s) {
  if (s.empty) return;
  if (s.compute_double) {
    run_step<double>(s.p);
  } else {
    run_step<float>(s.p);
  }
  s.finish();
}

at::Tensor noise_cpu(const at::Tensor& seeds, at::IntArrayRef sample_shape, int64_t step,
                     const std::optional<at::Tensor>& step_tensor, int64_t tag) {
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == at::kLong && seeds.dim() == 1,
              "fastflow: seeds must be a 1-D int64 CPU tensor");
  if (step_tensor.has_value()) {
    TORCH_CHECK(step_tensor->numel() == 1 && step_tensor->device().is_cpu(),
                "fastflow: the step tensor must be one element on the CPU");
    TORCH_CHECK_TYPE(step_tensor->scalar_type() == at::kLong || step_tensor->scalar_type() == at::kInt,
                     "fastflow: the step tensor must be int64 or int32");
    step = step_tensor->to(at::kLong).item<int64_t>();  // a CPU read is not a device sync
  }
  check_noise_counters(step, tag);
  std::vector<int64_t> shape{seeds.size(0)};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  at::Tensor result = at::empty(shape, seeds.options().dtype(at::kFloat));
  const at::Tensor sd = seeds.contiguous();
  const int64_t* sp = sd.data_ptr<int64_t>();
  float* dst = result.data_ptr<float>();
  const int64_t batch = seeds.size(0);
  const int64_t numel = batch > 0 ? result.numel() / batch : 0;
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  const uint32_t step32 = static_cast<uint32_t>(step);
  const uint32_t tag32 = static_cast<uint32_t>(tag);
  const int64_t grain = grain_items(kDrawGrainElements, numel, blocks);
  at::parallel_for(0, batch * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks;
      const int64_t e0 = (item - b * blocks) * kBlock;
      draw_block(static_cast<uint64_t>(sp[b]), e0, std::min(kBlock, numel - e0), step32, tag32,
                 dst + b * numel + e0);
    }
  });
  return result;
}

at::Tensor philox_cpu(const at::Tensor& counter, const at::Tensor& key, int64_t rounds) {
  TORCH_CHECK(counter.device().is_cpu() && key.device().is_cpu(), "fastflow: philox CPU kernel got device tensors");
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
              "fastflow: philox counter and key must be int64");
  TORCH_CHECK(counter.dim() >= 1 && counter.size(-1) == 4 && key.dim() >= 1 && key.size(-1) == 2 &&
                  counter.numel() / 4 == key.numel() / 2,
              "fastflow: philox wants counter [..., 4] and key [..., 2] with as many rows");
  check_philox_rounds(rounds);
  const at::Tensor c = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor result = at::empty(counter.sizes(), counter.options());
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* rp = result.data_ptr<int64_t>();
  const int r = static_cast<int>(rounds);
  at::parallel_for(0, c.numel() / 4, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Words4 w = philox4x32(static_cast<uint32_t>(cp[4 * i]), static_cast<uint32_t>(cp[4 * i + 1]),
                                  static_cast<uint32_t>(cp[4 * i + 2]), static_cast<uint32_t>(cp[4 * i + 3]),
                                  static_cast<uint32_t>(kp[2 * i]), static_cast<uint32_t>(kp[2 * i + 1]), r);
      for (int j = 0; j < 4; ++j) rp[4 * i + j] = static_cast<int64_t>(w.x[j]);
    }
  });
  return result;
}

TORCH_LIBRARY_IMPL(fastflow, CPU, m) {
  m.impl("fused_step", &fused_step_cpu);
  m.impl("noise", &noise_cpu);
  m.impl("philox", &philox_cpu);
}

}  // namespace fastflow
