// The CPU kernel's 16-bit loads and stores, eight elements at a time, for x86-64 CPUs
// that have the instructions (checked at run time; the extension is built for the
// baseline ISA): float16 with F16C, bfloat16 with AVX2. c10's conversions run one
// element at a time (float16's in software), which made a float16 step about 6x a
// float32 one. The values are c10's and torch's: float16 to float32 exact, float32 to
// float16 rounded to nearest even (F16C's IEEE conversion; a NaN's payload bits are
// F16C's, as torch's own vectorized conversion writes them); bfloat16 to float32 a
// shift, float32 to bfloat16 c10's rounding to nearest even with NaN as 0x7FC0. Callers
// check cpu_features.h first.
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define FASTFLOW_HALF_X86 1
#include <immintrin.h>

#include <cstdint>

namespace fastflow {
namespace half_x86 {

#define FF_F16C __attribute__((target("avx,f16c"))) inline
#define FF_AVX2 __attribute__((target("avx2"))) inline

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

FF_F16C void half_to_float(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

FF_F16C void float_to_half(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRound));
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], kRound);
}

FF_AVX2 void bf16_to_float(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
  for (; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    __builtin_memcpy(dst + i, &bits, 4);
  }
}

inline uint16_t float_to_bf16_1(float x) {
  if (x != x) return 0x7FC0;
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

FF_AVX2 void float_to_bf16(const float* src, int64_t n, uint16_t* dst) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), nan16 = _mm256_set1_epi32(0x7FC0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, odd)), 16);
    r = _mm256_blendv_epi8(r, nan16, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  for (; i < n; ++i) dst[i] = float_to_bf16_1(src[i]);
}

#undef FF_F16C
#undef FF_AVX2

}  // namespace half_x86
}  // namespace fastflow
#endif
