// The CPU kernel's float32 noise, four Philox groups at a time with AVX2, for x86-64
// CPUs that have it (checked at run time; the extension is built for the baseline ISA).
//
// The CPU kernel's normals are words_to_normals_f64's: the spec's transform in double
// with the C library's log, cos and sin, one rounding to float32, so they equal the
// torch reference's bit for bit. That costs about 18 ns an element on one core (libm
// calls, one element at a time). Here the same double-precision values are
// approximated without calls, four lanes at once, far closer than float32 can tell
// (log, cos and sin each within 2^-51.9 relative of the exact values on 1.7e7 samples;
// the normal, with the sqrt and the product, some 2^9 times inside the 2^-40 the
// rounding test allows, as the exact path's libm values are): log(u) from u's
// exponent and the atanh series of its mantissa, cos and sin of the reference's
// argument fl(pi v) by a three-part pi/2 reduction and Taylor polynomials. Each value
// is then rounded to float32 only where that rounding is decided: where the
// approximation lies within 2^-40 (relative) of a midpoint between two floats, the whole
// group is evaluated again by words_to_normals_f64 (about 1 group in 10^4), so every
// float32 normal is the one the exact path writes. Checked against it on 2 * 10^8
// normals (0 differ) and by the tests against the torch reference; about 6.6 ns an
// element on this project's CPU machine.
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define FASTFLOW_AVX2_NOISE 1
#include <immintrin.h>

#include <cstdint>

#include "cpu_features.h"
#include "fastflow_step.h"

namespace fastflow {
namespace avx2 {

#define FF_AVX2 __attribute__((target("avx2"))) inline

// Integers below 2^52 in 64-bit lanes as doubles, exactly (AVX2 has no int64 conversion).
FF_AVX2 __m256d small_u64_to_f64(__m256i x) {
  const __m256i magic = _mm256_set1_epi64x(0x4330000000000000LL);  // 2^52
  return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(x, magic)), _mm256_set1_pd(0x1p52));
}

// The four Philox4x32-10 words of groups g0 .. g0+3 (philox4x32 / noise_words), each word's four groups in the
// low halves of 64-bit lanes.
FF_AVX2 void philox_words4(uint64_t seed, uint64_t g0, uint32_t step, uint32_t tag, __m256i w[4]) {
  const __m256i low32 = _mm256_set1_epi64x(0xffffffffLL);
  const __m256i g = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(g0)), _mm256_set_epi64x(3, 2, 1, 0));
  __m256i c0 = _mm256_and_si256(g, low32);
  __m256i c1 = _mm256_srli_epi64(g, 32);
  __m256i c2 = _mm256_set1_epi64x(step);
  __m256i c3 = _mm256_set1_epi64x(tag);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const __m256i p0 = _mm256_mul_epu32(m0, c0);  // 32 x 32 -> 64 bits: hi and lo of mulhilo32
    const __m256i p1 = _mm256_mul_epu32(m1, c2);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1), _mm256_set1_epi64x(k0));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3), _mm256_set1_epi64x(k1));
    c0 = n0;
    c1 = _mm256_and_si256(p1, low32);
    c2 = n2;
    c3 = _mm256_and_si256(p0, low32);
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

// The odd numerator (2 (w >> 9) + 1) of a word's uniform, as a double.
FF_AVX2 __m256d uniform_numerator(__m256i w) {
  return small_u64_to_f64(_mm256_or_si256(_mm256_slli_epi64(_mm256_srli_epi64(w, 9), 1), _mm256_set1_epi64x(1)));
}

// log(k 2^-24) for odd k in [1, 2^24): k = 2^e f with f in [sqrt(1/2), sqrt(2)), log f = 2 atanh(s),
// s = (f - 1) / (f + 1), |s| < 0.172, ten terms of the series (truncation below 2^-55 relative).
FF_AVX2 __m256d log_grid(__m256d k) {
  const __m256i bits = _mm256_castpd_si256(k);
  __m256d f = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi64x(0x000fffffffffffffLL)),
                                                  _mm256_set1_epi64x(0x3ff0000000000000LL)));
  __m256d e = small_u64_to_f64(_mm256_srli_epi64(bits, 52));  // biased exponent (k > 0)
  const __m256d big = _mm256_cmp_pd(f, _mm256_set1_pd(1.4142135623730951), _CMP_GT_OQ);
  f = _mm256_blendv_pd(f, _mm256_mul_pd(f, _mm256_set1_pd(0.5)), big);
  e = _mm256_add_pd(e, _mm256_and_pd(big, _mm256_set1_pd(1.0)));
  const __m256d de = _mm256_sub_pd(e, _mm256_set1_pd(1023.0 + 24.0));  // the exponent of u = k 2^-24
  const __m256d one = _mm256_set1_pd(1.0);
  const __m256d s = _mm256_div_pd(_mm256_sub_pd(f, one), _mm256_add_pd(f, one));
  const __m256d z = _mm256_mul_pd(s, s);
  constexpr double kInvOdd[] = {1.0 / 17, 1.0 / 15, 1.0 / 13, 1.0 / 11, 1.0 / 9, 1.0 / 7, 1.0 / 5, 1.0 / 3};
  __m256d p = _mm256_set1_pd(1.0 / 19);
  for (const double c : kInvOdd) p = _mm256_add_pd(_mm256_mul_pd(p, z), _mm256_set1_pd(c));
  const __m256d s2 = _mm256_add_pd(s, s);
  const __m256d log_f = _mm256_add_pd(s2, _mm256_mul_pd(s2, _mm256_mul_pd(z, p)));
  // e ln 2 with ln 2 in two parts (the first with trailing zeros, so e times it is exact).
  const __m256d hi = _mm256_mul_pd(de, _mm256_set1_pd(0x1.62e42fee00000p-1));
  const __m256d lo = _mm256_add_pd(_mm256_mul_pd(de, _mm256_set1_pd(0x1.a39ef35793c76p-33)), log_f);
  return _mm256_add_pd(hi, lo);
}

// cos x and sin x for x in [-pi, pi]: x = q pi/2 + t with q = round(2x/pi) and t by a three-part pi/2 (exact
// first product), Taylor polynomials on |t| <= pi/4 (to t^15 and t^16), then q's quarter turn.
FF_AVX2 void cos_sin(__m256d x, __m256d& cos_out, __m256d& sin_out) {
  const __m256d q = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(0.6366197723675814)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d t = _mm256_sub_pd(x, _mm256_mul_pd(q, _mm256_set1_pd(0x1.921fb54400000p+0)));
  t = _mm256_sub_pd(t, _mm256_mul_pd(q, _mm256_set1_pd(0x1.0b4611a600000p-34)));
  t = _mm256_sub_pd(t, _mm256_mul_pd(q, _mm256_set1_pd(0x1.3198a2e037073p-69)));
  const __m256d t2 = _mm256_mul_pd(t, t);
  constexpr double kSin[] = {1.0 / 6227020800.0, -1.0 / 39916800.0, 1.0 / 362880.0, -1.0 / 5040.0, 1.0 / 120.0,
                             -1.0 / 6.0};
  __m256d sp = _mm256_set1_pd(-1.0 / 1307674368000.0);
  for (const double c : kSin) sp = _mm256_add_pd(_mm256_mul_pd(sp, t2), _mm256_set1_pd(c));
  const __m256d sin_t = _mm256_add_pd(t, _mm256_mul_pd(t, _mm256_mul_pd(t2, sp)));
  constexpr double kCos[] = {-1.0 / 87178291200.0, 1.0 / 479001600.0, -1.0 / 3628800.0, 1.0 / 40320.0,
                             -1.0 / 720.0, 1.0 / 24.0};
  __m256d cp = _mm256_set1_pd(1.0 / 20922789888000.0);
  for (const double c : kCos) cp = _mm256_add_pd(_mm256_mul_pd(cp, t2), _mm256_set1_pd(c));
  const __m256d cos_t = _mm256_add_pd(_mm256_sub_pd(_mm256_set1_pd(1.0), _mm256_mul_pd(_mm256_set1_pd(0.5), t2)),
                                      _mm256_mul_pd(_mm256_mul_pd(t2, t2), cp));
  const __m256i quarter = _mm256_and_si256(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(q)), _mm256_set1_epi64x(3));
  const __m256i one = _mm256_set1_epi64x(1), two = _mm256_set1_epi64x(2);
  const __m256d odd = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(quarter, one), one));  // swap
  const __m256d c = _mm256_blendv_pd(cos_t, sin_t, odd);
  const __m256d s = _mm256_blendv_pd(sin_t, cos_t, odd);
  const __m256d neg_c =
      _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(_mm256_add_epi64(quarter, one), two), two));
  const __m256d neg_s = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(quarter, two), two));
  const __m256d sign = _mm256_set1_pd(-0.0);
  cos_out = _mm256_xor_pd(c, _mm256_and_pd(neg_c, sign));
  sin_out = _mm256_xor_pd(s, _mm256_and_pd(neg_s, sign));
}

// d rounded to float32; clears the lanes of `decided` where a value within |d| 2^-40 of d could round otherwise
// (d near a midpoint between two floats). The values are normals: finite, nonzero, far from float32's limits.
FF_AVX2 __m128 round_decided(__m256d d, __m256d& decided) {
  const __m128 f = _mm256_cvtpd_ps(d);
  const __m128i bits = _mm_castps_si128(f);
  const __m256d fd = _mm256_cvtps_pd(f);
  const __m256d away = _mm256_cvtps_pd(_mm_castsi128_ps(_mm_add_epi32(bits, _mm_set1_epi32(1))));
  const __m256d toward = _mm256_cvtps_pd(_mm_castsi128_ps(_mm_sub_epi32(bits, _mm_set1_epi32(1))));
  const __m256d half = _mm256_set1_pd(0.5);
  const __m256d m1 = _mm256_mul_pd(half, _mm256_add_pd(fd, away));  // midpoints, exact in double
  const __m256d m2 = _mm256_mul_pd(half, _mm256_add_pd(fd, toward));
  const __m256d lo = _mm256_min_pd(m1, m2), hi = _mm256_max_pd(m1, m2);
  const __m256d err = _mm256_mul_pd(_mm256_andnot_pd(_mm256_set1_pd(-0.0), d), _mm256_set1_pd(0x1p-40));
  decided = _mm256_and_pd(decided, _mm256_and_pd(_mm256_cmp_pd(_mm256_sub_pd(d, err), lo, _CMP_GT_OQ),
                                                 _mm256_cmp_pd(_mm256_add_pd(d, err), hi, _CMP_LT_OQ)));
  return f;
}

// Normals of elements [e0, e0 + 16 * chunks) of a sample (e0 a multiple of 4), 16 at a time: what draw_block's
// words_to_normals_f64<float> writes, element for element. Returns how many groups were evaluated exactly.
__attribute__((target("avx2"))) inline int64_t draw_normals(uint64_t seed, int64_t e0, int64_t chunks,
                                                            uint32_t step, uint32_t tag, float* dst) {
  int64_t exact = 0;
  const __m256d pi = _mm256_set1_pd(3.141592653589793);  // the double nearest pi, as the exact path's
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const uint64_t g0 = static_cast<uint64_t>(e0 >> 2) + 4 * static_cast<uint64_t>(chunk);
    float* out = dst + 16 * chunk;
    __m256i w[4];
    philox_words4(seed, g0, step, tag, w);
    __m256d decided = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
    __m128 n[4];
    for (int pair = 0; pair < 2; ++pair) {  // normals 2 pair and 2 pair + 1 of each group
      const __m256d u_num = uniform_numerator(w[2 * pair]);
      const __m256d v = _mm256_sub_pd(_mm256_mul_pd(uniform_numerator(w[2 * pair + 1]), _mm256_set1_pd(0x1p-23)),
                                      _mm256_set1_pd(1.0));
      const __m256d r = _mm256_sqrt_pd(_mm256_mul_pd(_mm256_set1_pd(-2.0), log_grid(u_num)));
      __m256d c, s;
      cos_sin(_mm256_mul_pd(pi, v), c, s);
      n[2 * pair] = round_decided(_mm256_mul_pd(r, c), decided);
      n[2 * pair + 1] = round_decided(_mm256_mul_pd(r, s), decided);
    }
    _MM_TRANSPOSE4_PS(n[0], n[1], n[2], n[3]);  // lanes were groups: rows are now groups
    for (int g = 0; g < 4; ++g) _mm_storeu_ps(out + 4 * g, n[g]);
    const int ok = _mm256_movemask_pd(decided);
    if (ok != 0xf) {
      for (int g = 0; g < 4; ++g) {
        if (!((ok >> g) & 1)) {
          words_to_normals_f64<float>(noise_words(seed, g0 + g, step, tag), out + 4 * g);
          ++exact;
        }
      }
    }
  }
  return exact;
}

#undef FF_AVX2

}  // namespace avx2
}  // namespace fastflow
#endif
