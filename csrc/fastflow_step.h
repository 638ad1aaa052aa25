// fastflow's per-element step math, shared by the CPU and the CUDA kernels.
//
// Everything here is an inline function usable on the host and on the device,
// with no torch and no CUDA runtime dependency, so the same code builds a CPU
// kernel (tested without a GPU) and the CUDA kernel.
//
// The step plan (see fastflow/plan.py for the table layout), per element:
//   o      = o_uncond + W * (o_cond - o_uncond)     (guided; else o = o_cond)
//   x_hat  = AZ * z + AO * o, then clamp to [-clip, clip] when clipping
//   z_next = CZ * z + CX * x_hat + H0 * h0 + H1 * h1 + H2 * h2 + CN * xi
//   model_in_next = CIN * z_next
// Terms for absent history tensors or absent noise are skipped (not multiplied
// by zero), and operations are evaluated in exactly this order so the CPU build
// reproduces the torch reference bit for bit.
//
// Noise (fastflow/noise.py is the spec): Philox4x32-10 keyed by the sample's
// 64-bit seed, counter (group lo, group hi, step, tag), four normals per call,
// element e of a sample takes normal (e & 3) of group (e >> 2).
#pragma once

#include <stdint.h>
#include <string.h>

#include <cmath>
#include <type_traits>

#include "noise_poly.h"

#if defined(__CUDACC__)
#define FF_HD __host__ __device__ __forceinline__
#define FF_UNROLL _Pragma("unroll")
#define FF_NO_UNROLL _Pragma("unroll 1")
#else
#define FF_HD inline
#define FF_UNROLL
#define FF_NO_UNROLL
#endif

namespace fastflow {

// Columns of a coefficient table row (fastflow/plan.py).
enum Coef : int { kW = 0, kAZ, kAO, kCZ, kCX, kH0, kH1, kH2, kCN, kCIN, kNumCoefs };
constexpr int kMaxHistory = 3;

// Storage dtypes a kernel reads and writes; values are stable across the ABI.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr uint32_t kStepTag = 0;
constexpr uint32_t kInitTag = 1;

struct Words4 {
  uint32_t x[4];
};

FF_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox4x32 with `rounds` rounds; the key is bumped between rounds, not before the first.
FF_HD Words4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                        int rounds = kPhiloxRounds) {
  for (int r = 0; r < rounds; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words4{{c0, c1, c2, c3}};
}

// A sample's Philox key, split once for all the groups a kernel thread draws of it.
struct PhiloxKey {
  uint32_t k0;
  uint32_t k1;
};

FF_HD PhiloxKey philox_key(uint64_t seed) {
  return PhiloxKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

// The four Philox words of group `group` of a sample with key `key` at `step`.
FF_HD Words4 noise_words(const PhiloxKey& key, uint64_t group, uint32_t step, uint32_t tag) {
  return philox4x32(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), step, tag, key.k0, key.k1);
}

// The four Philox words of group `group` of a sample seeded with `seed` at `step`.
FF_HD Words4 noise_words(uint64_t seed, uint64_t group, uint32_t step, uint32_t tag) {
  return noise_words(philox_key(seed), group, step, tag);
}

// Multiply and add with one rounding each, never contracted into an FMA, so the
// kernels round exactly as the torch reference's separate mul and add ops do.
// T is float or double (the kernels' compute types).
template <typename T>
FF_HD T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}
template <typename T>
FF_HD T add_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

// Fused multiply-add with one rounding, on the device and on the host alike.
FF_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// cos(pi v) and sin(pi v) in float32 for v in (-1, 1), as fastflow/noise.py writes
// the kernels' evaluation: whole quarter turns q off the angle (exact), the
// polynomials of csrc/noise_poly.h as explicit fmas on t = (v - q/2) pi, then the
// quarter's swap and signs. The Triton kernel evaluates the same operations.
FF_HD void cos_sin_pi(float v, float& cos_out, float& sin_out) {
  const float q = floorf(add_rn(mul_rn(v, 2.0f), 0.5f));
  const float t = mul_rn(add_rn(v, mul_rn(q, -0.5f)), kPiF);
  const float t2 = mul_rn(t, t);
  const float s = fma_rn(mul_rn(t, t2), fma_rn(t2, fma_rn(t2, kSinPoly2, kSinPoly1), kSinPoly0), t);
  const float c = fma_rn(t2, fma_rn(t2, fma_rn(t2, fma_rn(t2, kCosPoly3, kCosPoly2), kCosPoly1), kCosPoly0), 1.0f);
  const int quarter = static_cast<int>(q) & 3;
  const bool odd = (quarter & 1) != 0;  // a quarter turn swaps sine and cosine
  const float sv = odd ? c : s;
  const float cv = odd ? s : c;
  sin_out = (quarter & 2) != 0 ? -sv : sv;          // quarters 2, 3
  cos_out = ((quarter + 1) & 2) != 0 ? -cv : cv;    // quarters 1, 2
}

FF_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

FF_HD uint32_t float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

// log(u) for a uniform of the transform, u = (2m + 1) 2^-24 in (0, 1), as CUDA's
// logf computes it for a positive normal input (its reduction and polynomial, read
// off its compiled code): u = 2^k (1 + f) with 1 + f in [2/3, 4/3), then
// k ln2 + f + f^2 P(f). logf also tests for zero, subnormal, infinite and NaN inputs,
// which a uniform never is; without those tests the radius costs 16 fewer
// instructions a group. The same bits as logf on the device (scripts/check_noise_math.cu
// compares all 2^23 uniforms on a GPU) and, being explicit fmas, on the host too.
FF_HD float log_uniform_f32(float u) {
  const uint32_t bits = float_to_bits(u);
  const uint32_t k_bits = (bits - 0x3f2aaaabu) & 0xff800000u;  // k in the exponent field
  const float f = add_rn(bits_to_float(bits - k_bits), -1.0f);
  const float k = mul_rn(static_cast<float>(static_cast<int32_t>(k_bits)), 0x1p-23f);
  float p = fma_rn(f, -0x1.0aa04ep-3f, 0x1.2073ecp-3f);
  p = fma_rn(f, p, -0x1.f19b98p-4f);
  p = fma_rn(f, p, 0x1.1e52aap-3f);
  p = fma_rn(f, p, -0x1.55b172p-3f);
  p = fma_rn(f, p, 0x1.99da16p-3f);
  p = fma_rn(f, p, -0x1.fffe44p-3f);
  p = fma_rn(f, p, 0x1.5554f0p-2f);
  p = fma_rn(f, p, -0.5f);
  p = mul_rn(f, p);
  return fma_rn(k, 0x1.62e430p-1f, fma_rn(f, p, f));
}

// The correctly rounded square root of a radius's square, -2 log u, in [1.1e-7, 33.3].
// On the device: sqrtf's own sequence for inputs in its fast range (an approximate
// reciprocal square root, then a correction that rounds correctly), without its
// range test and branch to a slow path; on the host std::sqrt, also correctly
// rounded, so the same value.
FF_HD float sqrt_radius_f32(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  const float s = __fmul_rn(x, y);
  const float h = __fmul_rn(y, 0.5f);
  return __fmaf_rn(__fmaf_rn(-s, s, x), h, s);
#else
  return std::sqrt(x);
#endif
}

// The spec's transform of four words into four standard normals, in float32 as the
// GPU kernels (CUDA and Triton) evaluate it: uniforms exact, logf (log_uniform_f32)
// and correctly rounded sqrtf (sqrt_radius_f32) for the radius, cos_sin_pi for the
// angle; within 1e-6 of the float64 spec. Every operation is explicit, so the host
// build computes the device's bits.
FF_HD void words_to_normals_f32(const Words4& w, float n[4]) {
  for (int pair = 0; pair < 2; ++pair) {
    const uint32_t wu = w.x[2 * pair];
    const uint32_t wv = w.x[2 * pair + 1];
    const float u = mul_rn(static_cast<float>((wu >> 8) | 1u), 0x1p-24f);           // (2m + 1) 2^-24
    const float v = add_rn(mul_rn(static_cast<float>((wv >> 8) | 1u), 0x1p-23f), -1.0f);  // (2m + 1) 2^-23 - 1
    const float r = sqrt_radius_f32(mul_rn(-2.0f, log_uniform_f32(u)));
    float c, s;
    cos_sin_pi(v, c, s);
    n[2 * pair] = mul_rn(r, c);
    n[2 * pair + 1] = mul_rn(r, s);
  }
}

// cos(pi v) and sin(pi v) in double: on the device sincospi (pi * v with v exact, so
// no reduction error); on the host the torch reference's cos and sin of pi * v.
FF_HD void cos_sin_pi_f64(double v, double& cos_out, double& sin_out) {
#if defined(__CUDA_ARCH__)
  sincospi(v, &sin_out, &cos_out);
#else
  constexpr double kPi = 3.141592653589793;  // the double nearest pi, as torch.pi
  cos_out = std::cos(kPi * v);
  sin_out = std::sin(kPi * v);
#endif
}

// The spec's transform in double precision (uniforms exact, log/sqrt/cos/sin in
// double, one rounding to T). On the host this is the torch reference's evaluation,
// so the CPU build reproduces its normals bit for bit up to libm differences in the
// last bit of a double.
template <typename T>
FF_HD void words_to_normals_f64(const Words4& w, T n[4]) {
  const double u0 = static_cast<double>(2u * (w.x[0] >> 9) + 1u) * 0x1p-24;
  const double v1 = static_cast<double>(2u * (w.x[1] >> 9) + 1u) * 0x1p-23 - 1.0;
  const double u2 = static_cast<double>(2u * (w.x[2] >> 9) + 1u) * 0x1p-24;
  const double v3 = static_cast<double>(2u * (w.x[3] >> 9) + 1u) * 0x1p-23 - 1.0;
  const double r0 = std::sqrt(-2.0 * std::log(u0));
  const double r2 = std::sqrt(-2.0 * std::log(u2));
  double c1, s1, c3, s3;
  cos_sin_pi_f64(v1, c1, s1);
  cos_sin_pi_f64(v3, c3, s3);
  n[0] = static_cast<T>(r0 * c1);
  n[1] = static_cast<T>(r0 * s1);
  n[2] = static_cast<T>(r2 * c3);
  n[3] = static_cast<T>(r2 * s3);
}

// The spec's transform in the compute type T of a kernel: on the device, float
// normals are words_to_normals_f32 (the Triton kernel's evaluation) and double ones
// words_to_normals_f64; on the host (the CPU kernel) always words_to_normals_f64.
template <typename T>
FF_HD void words_to_normals(const Words4& w, T n[4]) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    words_to_normals_f32(w, n);
  } else {
    words_to_normals_f64(w, n);
  }
#else
  words_to_normals_f64(w, n);
#endif
}

// Everything a launch needs, as plain pointers and flags (no torch types), so the
// same struct drives the CPU loop and the CUDA kernel. Tensors are contiguous;
// `numel` is the number of elements of one sample, `batch` the number of samples.
struct StepParams {
  const void* z = nullptr;
  void* out = nullptr;
  const void* model_out = nullptr;
  const void* model_out_uncond = nullptr;  // null: unguided
  const void* history[kMaxHistory] = {nullptr, nullptr, nullptr};
  const void* noise = nullptr;              // explicit noise, or null
  void* x_out = nullptr;                    // null: x_hat not written
  void* model_in_out = nullptr;             // null: next model input not written
  const int64_t* seeds = nullptr;           // per-sample seeds when drawing noise
  const void* table = nullptr;              // [rows, kNumCoefs]
  const void* step_ptr = nullptr;           // device step index (graph mode), or null
  int64_t step = 0;                         // host step index when step_ptr is null
  int64_t table_rows = 0;
  int64_t batch = 0;
  int64_t numel = 0;
  double clip = 0.0;
  int z_dtype = kFloat32;  // also out's
  int model_out_dtype = kFloat32;
  int uncond_dtype = kFloat32;
  int history_dtype[kMaxHistory] = {kFloat32, kFloat32, kFloat32};
  int noise_dtype = kFloat32;
  int x_out_dtype = kFloat32;
  int model_in_dtype = kFloat32;
  int table_dtype = kFloat32;  // kFloat32 or kFloat64
  int step_is_int32 = 0;       // step_ptr points at int32 (else int64)
  int num_history = 0;
  int use_noise = 0;
  int has_clip = 0;
  int model_in_double = 0;  // model_in_out has batch 2B: write both halves
  int vectorized = 0;       // all pointers 16-byte aligned and every sample a multiple of 16 bytes
};

// One row of coefficients in the compute type.
template <typename T>
struct Coefs {
  T c[kNumCoefs];
};

FF_HD int64_t load_step_index(const StepParams& p) {
  if (p.step_ptr == nullptr) return p.step;
  return p.step_is_int32 ? static_cast<int64_t>(*static_cast<const int32_t*>(p.step_ptr))
                         : *static_cast<const int64_t*>(p.step_ptr);
}

// The columns of a table row that a launch reads: the plan's coefficients for the
// inputs and outputs it has (the others are never used).
FF_HD uint32_t used_columns(const StepParams& p) {
  uint32_t cols = (1u << kAZ) | (1u << kAO) | (1u << kCZ) | (1u << kCX);
  if (p.model_out_uncond != nullptr) cols |= 1u << kW;
  for (int j = 0; j < kMaxHistory; ++j) {
    if (j < p.num_history) cols |= 1u << (kH0 + j);
  }
  if (p.use_noise) cols |= 1u << kCN;
  if (p.model_in_out != nullptr) cols |= 1u << kCIN;
  return cols;
}

// The table row for `step`, converted once to the compute type (as the reference's
// row.to(dtype)). Only the used columns are read (the rest are 0): on the device
// every thread reads the row, and ten loads per thread would rival its data loads.
// A step outside the table yields NaN coefficients rather than an out-of-bounds
// read: the device cannot raise, and NaN outputs make the error visible.
template <typename T>
FF_HD Coefs<T> load_coefs(const StepParams& p, int64_t step) {
  Coefs<T> k;
  if (step < 0 || step >= p.table_rows) {
FF_UNROLL
    for (int i = 0; i < kNumCoefs; ++i) k.c[i] = static_cast<T>(NAN);
    return k;
  }
  // One branch on the table's dtype, then every load issued before any is used (a
  // branch per column made each load wait for the one before it).
  const uint32_t cols = used_columns(p);
  if (p.table_dtype == kFloat64) {
    const double* row = static_cast<const double*>(p.table) + step * kNumCoefs;
    double v[kNumCoefs];
FF_UNROLL
    for (int i = 0; i < kNumCoefs; ++i) v[i] = ((cols >> i) & 1u) ? row[i] : 0.0;
FF_UNROLL
    for (int i = 0; i < kNumCoefs; ++i) k.c[i] = static_cast<T>(v[i]);
  } else {
    const float* row = static_cast<const float*>(p.table) + step * kNumCoefs;
    float v[kNumCoefs];
FF_UNROLL
    for (int i = 0; i < kNumCoefs; ++i) v[i] = ((cols >> i) & 1u) ? row[i] : 0.0f;
FF_UNROLL
    for (int i = 0; i < kNumCoefs; ++i) k.c[i] = static_cast<T>(v[i]);
  }
  return k;
}

// Clamp that propagates NaN like torch.clamp.
template <typename T>
FF_HD T clamp_nan(T x, T lo, T hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// The plan in pieces, so a kernel can fold each input in as soon as it is loaded
// (fewer live registers) or run each as a vectorizable pass over a block (the CPU
// kernel). Composed as the header comment writes the plan, they follow the reference's order.
template <typename T>
FF_HD T guide(const Coefs<T>& k, T o_cond, T o_uncond) {
  return add_rn(o_uncond, mul_rn(k.c[kW], o_cond - o_uncond));
}

template <typename T>
FF_HD T data_prediction(const Coefs<T>& k, T z, T o, bool has_clip, T clip) {
  const T x = add_rn(mul_rn(k.c[kAZ], z), mul_rn(k.c[kAO], o));
  return has_clip ? clamp_nan(x, -clip, clip) : x;
}

template <typename T>
FF_HD T update_base(const Coefs<T>& k, T z, T x) {
  return add_rn(mul_rn(k.c[kCZ], z), mul_rn(k.c[kCX], x));
}

// z_next += coefficient `col` times `v` (a history tensor or the noise).
template <typename T>
FF_HD T add_term(const Coefs<T>& k, int col, T acc, T v) {
  return add_rn(acc, mul_rn(k.c[col], v));
}

}  // namespace fastflow
