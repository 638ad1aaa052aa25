// The CUDA kernel's per-thread work, as host-and-device inline functions: the
// kernels in step_kernel.cu call them on the device, and a test harness
// (tests/csrc/emulate_cuda_kernel.cpp) runs the very same code on the CPU, thread by
// thread, so the vectorized and scalar paths, the 16-byte packing and the item
// mapping are tested without a GPU. Needs only CUDA's host-usable fp16/bf16 and
// vector-type headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <type_traits>

#include "fastflow_step.h"

namespace fastflow {

// Elements per work item of instantiation <T, kDraw> running plan Plan (step_plans.h):
// 8 (two 16-byte accesses per float32 tensor, one per 16-bit tensor), or, where the
// kernel draws noise in float32, the plan's kDrawWidth: 8 (two Philox groups) or 4
// (one). Wider items spread the per-item work (the Philox key schedule, addresses,
// the loop) over more elements, but hold more registers: on an H200 at 19.4M elements
// (benchmarks/results/h200-2026-11-27-5374fcd/kernel_variants.md, v11 against v12) 8
// took a DDPM step from 57.9 to 54.7 us and one that also writes the next model input
// from 70.8 to 65.5, yet one writing x_hat from 74.8 to 92.7 and an unaligned one
// (the scalar path) from 124.6 to 187.8.
template <typename T, bool kDraw, typename Plan>
constexpr int kItemWidth = (kDraw && std::is_same_v<T, float>) ? Plan::kDrawWidth : 8;

// Whether instantiation <T, kDraw> runs only launches that draw their noise in the
// kernel: the launcher sends every float launch that draws (and no other) to
// <float, true>; <double, true> serves every double launch.
template <typename T, bool kDraw>
constexpr bool kOnlyDraws = kDraw && std::is_same_v<T, float>;

// The launcher's invariants for <T, kDraw> written into the kernel's copy of the
// parameters, so the compiler resolves those switches at compile time. For the
// drawing kernel that removes the explicit-noise and no-noise paths: 14 % less
// device time on the H200 (benchmarks/cuda_step_variants.cu, "noise fixed", which
// pins the parameters the same way).
template <typename T, bool kDraw>
FF_HD void pin_launch_invariants(StepParams& p) {
  if constexpr (kOnlyDraws<T, kDraw>) {
    p.use_noise = 1;
    p.noise = nullptr;
  }
}

// Work items of one sample for instantiation <T, kDraw> and plan Plan (the launch's item count is batch times this).
template <typename T, bool kDraw, typename Plan>
FF_HD int64_t items_per_sample(const StepParams& p) {
  constexpr int W = kItemWidth<T, kDraw, Plan>;
  return (p.numel + W - 1) / W;
}

// Launch shape of the step kernels, from the H200 measurements of
// benchmarks/cuda_step_variants.cu at 19.4M elements: the deterministic kernel
// (memory-bound) runs best in 128-thread blocks, one item per thread; the float
// noise-drawing kernel (issue-bound) in 256-thread blocks with up to 16 elements per
// thread (4 items of 4, 2 of 8), which spreads each thread's prologue (step index,
// coefficient row, seed) over more elements. The double kernel takes the drawing
// shape unmeasured (its items of 8, 2 a thread; 4 before the drawing kernel's items
// of 8). A thread takes more items only while the grid keeps kMinBlocks blocks, a
// few waves of a large GPU, so small steps keep their parallelism.
template <bool kDraw, int kWidth>
struct LaunchShape {
  static constexpr int64_t threads = kDraw ? 256 : 128;
  static constexpr int64_t max_items_per_thread = kDraw ? 16 / kWidth : 1;
};
constexpr int64_t kMinBlocks = 2048;
constexpr int64_t kMaxGridX = 0x7FFFFFFF;  // the kernels loop over the rest
constexpr int64_t kMaxGridY = 65535;

// A step launch's 2-D grid: blocks of `threads` along a sample's items (x), one row
// per sample (y, strided past kMaxGridY). blocks_x is 0 when there is nothing to do.
struct StepGrid {
  int64_t threads;
  int64_t blocks_x;
  int64_t rows;
};

template <typename T, bool kDraw, typename Plan>
FF_HD StepGrid step_grid(const StepParams& p) {
  using Shape = LaunchShape<kDraw, kItemWidth<T, kDraw, Plan>>;
  const int64_t ips = items_per_sample<T, kDraw, Plan>(p);
  if (ips == 0 || p.batch == 0) return {Shape::threads, 0, 0};
  // Samples of fewer items than a block has threads get a smaller block (whole warps), not idle threads.
  const int64_t threads = ips >= Shape::threads ? Shape::threads : (ips + 31) / 32 * 32;
  const int64_t rows = p.batch < kMaxGridY ? p.batch : kMaxGridY;
  int64_t blocks_x = (ips + threads - 1) / threads;
  for (int64_t k = Shape::max_items_per_thread; k > 1; k /= 2) {
    const int64_t fewer = (ips + threads * k - 1) / (threads * k);
    if (fewer * rows >= kMinBlocks) {
      blocks_x = fewer;
      break;
    }
  }
  return {threads, blocks_x < kMaxGridX ? blocks_x : kMaxGridX, rows};
}

FF_HD float half_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xFFFFu)));
}
FF_HD float bf16_bits_to_float(uint32_t bits) { return bits_to_float((bits & 0xFFFFu) << 16); }
FF_HD uint32_t float_to_half_bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
FF_HD uint32_t float_to_bf16_bits(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

template <typename T>
FF_HD T load1(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat32:
      return static_cast<T>(static_cast<const float*>(base)[i]);
    case kFloat16:
      return static_cast<T>(half_bits_to_float(static_cast<const unsigned short*>(base)[i]));
    case kBFloat16:
      return static_cast<T>(bf16_bits_to_float(static_cast<const unsigned short*>(base)[i]));
    default:
      return static_cast<T>(static_cast<const double*>(base)[i]);
  }
}

// Rounds once to the storage type (half types from double go through float, as torch's own copy does).
template <typename T>
FF_HD void store1(void* base, int dtype, int64_t i, T v) {
  switch (dtype) {
    case kFloat32:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      break;
    case kFloat16:
      static_cast<unsigned short*>(base)[i] = static_cast<unsigned short>(float_to_half_bits(static_cast<float>(v)));
      break;
    case kBFloat16:
      static_cast<unsigned short*>(base)[i] = static_cast<unsigned short>(float_to_bf16_bits(static_cast<float>(v)));
      break;
    default:
      static_cast<double*>(base)[i] = static_cast<double>(v);
      break;
  }
}

// W (4 or 8) elements from an address aligned to their size (16 bytes for 8 16-bit
// elements or 4 float32; 8 bytes for 4 16-bit elements).
template <int W, typename T>
FF_HD void loadv(const void* base, int dtype, int64_t off, T v[W]) {
  static_assert(W == 4 || W == 8, "items are 4 or 8 elements");
  switch (dtype) {
    case kFloat32: {
      const float4* s = reinterpret_cast<const float4*>(static_cast<const float*>(base) + off);
FF_UNROLL
      for (int j = 0; j < W / 4; ++j) {
        const float4 a = s[j];
        v[4 * j] = a.x, v[4 * j + 1] = a.y, v[4 * j + 2] = a.z, v[4 * j + 3] = a.w;
      }
      break;
    }
    case kFloat16:
    case kBFloat16: {
      uint32_t w[W / 2];
      const unsigned short* src = static_cast<const unsigned short*>(base) + off;
      if constexpr (W == 8) {
        const uint4 r = *reinterpret_cast<const uint4*>(src);
        w[0] = r.x, w[1] = r.y, w[2] = r.z, w[3] = r.w;
      } else {
        const uint2 r = *reinterpret_cast<const uint2*>(src);
        w[0] = r.x, w[1] = r.y;
      }
      const bool half = dtype == kFloat16;
FF_UNROLL
      for (int j = 0; j < W / 2; ++j) {
        v[2 * j] = static_cast<T>(half ? half_bits_to_float(w[j]) : bf16_bits_to_float(w[j]));
        v[2 * j + 1] = static_cast<T>(half ? half_bits_to_float(w[j] >> 16) : bf16_bits_to_float(w[j] >> 16));
      }
      break;
    }
    default: {
      const double2* s = reinterpret_cast<const double2*>(static_cast<const double*>(base) + off);
FF_UNROLL
      for (int j = 0; j < W / 2; ++j) {
        const double2 d = s[j];
        v[2 * j] = static_cast<T>(d.x);
        v[2 * j + 1] = static_cast<T>(d.y);
      }
      break;
    }
  }
}

// One 16- or 8-byte vector store (st.global.v4 / v2). On the device it is written
// out in PTX: NVVM split the aggregate assignment into scalar stores in the
// 8-element kernels (measured at half the deterministic kernel's bandwidth), and
// the __stwb intrinsic compiles to a strong (STG.*.STRONG.SM) store rather than
// the plain one. scripts/check_cuda_compile.sh fails if a step kernel loses them.
#if defined(__CUDA_ARCH__)
#define FF_ST_GLOBAL(ptx, ...) asm volatile(ptx ::"l"(__cvta_generic_to_global(dst)), __VA_ARGS__ : "memory")
FF_HD void store_vec(float4* dst, float4 v) {
  FF_ST_GLOBAL("st.global.v4.f32 [%0], {%1, %2, %3, %4};", "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w));
}
FF_HD void store_vec(uint4* dst, uint4 v) {
  FF_ST_GLOBAL("st.global.v4.b32 [%0], {%1, %2, %3, %4};", "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
FF_HD void store_vec(uint2* dst, uint2 v) { FF_ST_GLOBAL("st.global.v2.b32 [%0], {%1, %2};", "r"(v.x), "r"(v.y)); }
FF_HD void store_vec(double2* dst, double2 v) {
  FF_ST_GLOBAL("st.global.v2.f64 [%0], {%1, %2};", "d"(v.x), "d"(v.y));
}
#undef FF_ST_GLOBAL
#else
template <typename V>
inline void store_vec(V* dst, const V& v) {
  *dst = v;
}
#endif

// W (4 or 8) elements to an address aligned as for loadv.
template <int W, typename T>
FF_HD void storev(void* base, int dtype, int64_t off, const T v[W]) {
  static_assert(W == 4 || W == 8, "items are 4 or 8 elements");
  switch (dtype) {
    case kFloat32: {
      float4* d = reinterpret_cast<float4*>(static_cast<float*>(base) + off);
FF_UNROLL
      for (int j = 0; j < W / 4; ++j) {
        store_vec(d + j, make_float4(static_cast<float>(v[4 * j]), static_cast<float>(v[4 * j + 1]),
                                     static_cast<float>(v[4 * j + 2]), static_cast<float>(v[4 * j + 3])));
      }
      break;
    }
    case kFloat16:
    case kBFloat16: {
      const bool half = dtype == kFloat16;
      uint32_t w[W / 2];
FF_UNROLL
      for (int j = 0; j < W / 2; ++j) {
        const float a = static_cast<float>(v[2 * j]);
        const float b = static_cast<float>(v[2 * j + 1]);
        const uint32_t lo = half ? float_to_half_bits(a) : float_to_bf16_bits(a);
        const uint32_t hi = half ? float_to_half_bits(b) : float_to_bf16_bits(b);
        w[j] = lo | (hi << 16);
      }
      unsigned short* dst = static_cast<unsigned short*>(base) + off;
      if constexpr (W == 8) {
        store_vec(reinterpret_cast<uint4*>(dst), make_uint4(w[0], w[1], w[2], w[3]));
      } else {
        store_vec(reinterpret_cast<uint2*>(dst), make_uint2(w[0], w[1]));
      }
      break;
    }
    default: {
      double2* d = reinterpret_cast<double2*>(static_cast<double*>(base) + off);
FF_UNROLL
      for (int j = 0; j < W / 2; ++j) {
        store_vec(d + j, make_double2(static_cast<double>(v[2 * j]), static_cast<double>(v[2 * j + 1])));
      }
      break;
    }
  }
}

// One element through the plan with scalar accesses (xi: its normal when drawing noise).
template <typename T>
FF_HD void step_element(const StepParams& p, const Coefs<T>& k, int64_t i, T xi, bool guided,
                                             bool has_clip, T clip) {
  const T z = load1<T>(p.z, p.z_dtype, i);
  T o = load1<T>(p.model_out, p.model_out_dtype, i);
  if (guided) o = guide(k, o, load1<T>(p.model_out_uncond, p.uncond_dtype, i));
  const T x = data_prediction(k, z, o, has_clip, clip);
  T zn = update_base(k, z, x);
FF_UNROLL
  for (int j = 0; j < kMaxHistory; ++j) {  // unrolled: k.c stays in registers
    if (j < p.num_history) zn = add_term(k, kH0 + j, zn, load1<T>(p.history[j], p.history_dtype[j], i));
  }
  if (p.use_noise) {
    if (p.noise != nullptr) xi = load1<T>(p.noise, p.noise_dtype, i);
    zn = add_term(k, kCN, zn, xi);
  }
  if (p.x_out != nullptr) store1(p.x_out, p.x_out_dtype, i, x);
  if (p.model_in_out != nullptr) {
    const T mi = mul_rn(k.c[kCIN], zn);
    store1(p.model_in_out, p.model_in_dtype, i, mi);
    if (p.model_in_double) store1(p.model_in_out, p.model_in_dtype, i + p.batch * p.numel, mi);
  }
  store1(p.out, p.z_dtype, i, zn);
}

// Whether a launch draws its noise in the kernel (Philox). The launcher runs an
// instantiation with kDraw = false when it does not, so deterministic steps run
// without the Philox and Box-Muller code and its registers (higher occupancy), and
// <float, true> only when it does (kOnlyDraws); <double, true> handles every launch.
FF_HD bool draws_noise(const StepParams& p) { return p.use_noise != 0 && p.noise == nullptr; }

// The slow path for an item that cannot use 16-byte accesses (a sample's last,
// partial item, or unaligned tensors): one element at a time, one Philox per group.
// Its loop stays rolled so it does not raise the vector path's register count.
template <typename T, bool kDraw>
FF_HD void step_item_scalar(const StepParams& p, const Coefs<T>& k, const PhiloxKey& key, int64_t base, int64_t e0,
                                                 int n, uint32_t step32) {
  const bool guided = p.model_out_uncond != nullptr;
  const bool has_clip = p.has_clip != 0;
  const T clip = static_cast<T>(p.clip);
  const bool draw = kDraw && draws_noise(p);
  const int64_t off = base + e0;
FF_NO_UNROLL
  for (int g = 0; g < n; g += 4) {
    T v[4] = {T(0), T(0), T(0), T(0)};
    if (draw) words_to_normals(noise_words(key, static_cast<uint64_t>((e0 + g) >> 2), step32, kStepTag), v);
FF_UNROLL
    for (int j = 0; j < 4; ++j) {
      if (g + j < n) step_element(p, k, off + g + j, v[j], guided, has_clip, clip);
    }
  }
}

// One full item of W elements with vector accesses (the launch's tensors are aligned for them).
template <typename T, bool kDraw, int W>
FF_HD void step_item_vector(const StepParams& p, const Coefs<T>& k, const PhiloxKey& key, int64_t base, int64_t e0,
                            uint32_t step32) {
  const T clip = static_cast<T>(p.clip);
  const bool guided = p.model_out_uncond != nullptr;
  const bool use_noise = p.use_noise != 0;
  const bool has_clip = p.has_clip != 0;
  const int nh = p.num_history;
  const int64_t off = base + e0;

  // Fold each input into the result as soon as it is loaded: few arrays stay live.
  T x[W], zn[W];
  {
    T z[W], o[W];
    loadv<W>(p.z, p.z_dtype, off, z);
    loadv<W>(p.model_out, p.model_out_dtype, off, o);
    if (guided) {
      T ou[W];
      loadv<W>(p.model_out_uncond, p.uncond_dtype, off, ou);
FF_UNROLL
      for (int i = 0; i < W; ++i) o[i] = guide(k, o[i], ou[i]);
    }
FF_UNROLL
    for (int i = 0; i < W; ++i) {
      x[i] = data_prediction(k, z[i], o[i], has_clip, clip);
      zn[i] = update_base(k, z[i], x[i]);
    }
  }
FF_UNROLL
  for (int j = 0; j < kMaxHistory; ++j) {
    if (j < nh) {
      T h[W];
      loadv<W>(p.history[j], p.history_dtype[j], off, h);
FF_UNROLL
      for (int i = 0; i < W; ++i) zn[i] = add_term(k, kH0 + j, zn[i], h[i]);
    }
  }
  if (use_noise) {
    T xi[W];
    if (!kDraw || p.noise != nullptr) {
      loadv<W>(p.noise, p.noise_dtype, off, xi);
    } else {
FF_UNROLL
      for (int g = 0; g < W / 4; ++g) {
        words_to_normals(noise_words(key, static_cast<uint64_t>(e0 >> 2) + g, step32, kStepTag), &xi[4 * g]);
      }
    }
FF_UNROLL
    for (int i = 0; i < W; ++i) zn[i] = add_term(k, kCN, zn[i], xi[i]);
  }
  if (p.x_out != nullptr) storev<W>(p.x_out, p.x_out_dtype, off, x);
  if (p.model_in_out != nullptr) {
    T mi[W];
FF_UNROLL
    for (int i = 0; i < W; ++i) mi[i] = mul_rn(k.c[kCIN], zn[i]);
    storev<W>(p.model_in_out, p.model_in_dtype, off, mi);
    if (p.model_in_double) storev<W>(p.model_in_out, p.model_in_dtype, off + p.batch * p.numel, mi);
  }
  storev<W>(p.out, p.z_dtype, off, zn);
}

// The work of one thread: items item0, item0 + item_stride, ... of samples b0,
// b0 + b_stride, ... (an item is kItemWidth<T, kDraw, Plan> consecutive elements of
// one sample, items_per_sample of them per sample). On the device b0 is blockIdx.y,
// so the sample, its seed and the Philox key schedule are the same for a whole block
// (the uniform datapath) and no thread divides to find its sample.
// kDraw = false needs !draws_noise(p); <float, true> needs draws_noise(p), which the
// kernels pin (pin_launch_invariants). p has Plan pinned (Plan::pin).
template <typename T, bool kDraw, typename Plan>
FF_HD void fused_step_items(const StepParams& p, int64_t items_per_sample, int64_t b0, int64_t b_stride,
                            int64_t item0, int64_t item_stride) {
  constexpr int W = kItemWidth<T, kDraw, Plan>;
  if (item0 >= items_per_sample || b0 >= p.batch) return;
  const int64_t step = load_step_index(p);
  const Coefs<T> k = load_coefs<T>(p, step);
  const uint32_t step32 = static_cast<uint32_t>(step);
  // Items before vector_items take the vector path: all of them but a partial last one, when aligned.
  const int64_t vector_items = p.vectorized ? p.numel / W : 0;
  for (int64_t b = b0; b < p.batch; b += b_stride) {
    // The sample's Philox key (its seed) and first element, once for all its items.
    PhiloxKey key{};
    if (kDraw && draws_noise(p)) key = philox_key(static_cast<uint64_t>(p.seeds[b]));
    const int64_t base = b * p.numel;  // the sample's first element
    for (int64_t item = item0; item < items_per_sample; item += item_stride) {
      const int64_t e0 = item * W;
      if (item < vector_items) {
        step_item_vector<T, kDraw, W>(p, k, key, base, e0, step32);
      } else {
        step_item_scalar<T, kDraw>(p, k, key, base, e0, static_cast<int>(p.numel - e0 < W ? p.numel - e0 : W),
                                   step32);
      }
    }
  }
}

}  // namespace fastflow
