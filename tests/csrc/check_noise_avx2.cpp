// The AVX2 noise path of the CPU kernel (csrc/noise_avx2.h) against the exact path it
// stands in for (words_to_normals_f64<float>), group for group; loaded by
// test_noise_avx2.py through ctypes (no torch needed).
#include <cstdint>
#include <cstring>
#include <vector>

#include "noise_avx2.h"

extern "C" {

// 1 when this build has the AVX2 path and this CPU runs it.
int avx2_noise_available() {
#if defined(FASTFLOW_AVX2_NOISE)
  return fastflow::cpu::has_avx2() ? 1 : 0;
#else
  return 0;
#endif
}

// The number of float32 normals of groups [g0, g0 + 4 * chunks) that differ (in bits) between the two paths;
// `*reevaluated`: how many groups the AVX2 path handed to the exact one.
int64_t avx2_noise_mismatches(uint64_t seed, uint64_t g0, int64_t chunks, uint32_t step, uint32_t tag,
                              int64_t* reevaluated) {
#if defined(FASTFLOW_AVX2_NOISE)
  std::vector<float> fast(16 * chunks), exact(16 * chunks);
  *reevaluated = fastflow::avx2::draw_normals(seed, static_cast<int64_t>(4 * g0), chunks, step, tag, fast.data());
  for (int64_t g = 0; g < 4 * chunks; ++g) {
    fastflow::words_to_normals_f64<float>(fastflow::noise_words(seed, g0 + g, step, tag), &exact[4 * g]);
  }
  int64_t differ = 0;
  for (int64_t i = 0; i < 16 * chunks; ++i) differ += std::memcmp(&fast[i], &exact[i], sizeof(float)) != 0;
  return differ;
#else
  (void)seed, (void)g0, (void)chunks, (void)step, (void)tag, (void)reevaluated;
  return -1;
#endif
}
}
