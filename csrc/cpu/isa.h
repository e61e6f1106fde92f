// Run-time choice of the instruction set for the CPU kernels: the tile loops are compiled twice, with 256-bit
// AVX+FMA (used where the CPU has it, checked once) and for the baseline ISA the extension is built for, so the
// extension loads on any x86-64.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ANISO_FAST_AVX __attribute__((target("avx,fma")))
inline bool cpu_has_avx_fma() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma");
  return has;
}
#else
#define ANISO_FAST_AVX
inline bool cpu_has_avx_fma() { return false; }
#endif
