// Which x86-64 instruction sets this CPU runs, each asked once. The extension is built
// for the baseline ISA; the CPU kernel's AVX2 noise (noise_avx2.h) and its 16-bit loads
// and stores (half_x86.h) run only where these say so.
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <cpuid.h>

namespace fastflow {
namespace cpu {

inline bool has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

// F16C from CPUID itself: older compilers' __builtin_cpu_supports does not know the name (AVX's check covers the
// operating system's support of the registers).
inline bool has_f16c() {
  static const bool has = [] {
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __builtin_cpu_supports("avx") && __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  }();
  return has;
}

}  // namespace cpu
}  // namespace fastflow
#endif
