// Run-time choice of the instruction set for the CPU kernels: the tile loops are compiled three times, with
// 512-bit AVX-512F+FMA, with 256-bit AVX+FMA (each used where the CPU has it, checked once) and for the baseline
// ISA the extension is built for, so the extension loads on any x86-64. The environment variable
// ANISO_FAST_CPU_ISA (`base`, `avx` or `avx512`), read per call, caps the choice: the tests run every variant the
// CPU has.
#pragma once

#include <cstdlib>
#include <cstring>

enum class Isa { kBase = 0, kAvx = 1, kAvx512 = 2 };

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ANISO_FAST_AVX __attribute__((target("avx,fma")))
#define ANISO_FAST_AVX512 __attribute__((target("avx512f,avx2,fma")))
inline Isa cpu_isa() {
  static const Isa isa = !(__builtin_cpu_supports("avx") && __builtin_cpu_supports("fma")) ? Isa::kBase
                         : __builtin_cpu_supports("avx512f")                                 ? Isa::kAvx512
                                                                                             : Isa::kAvx;
  return isa;
}
#else
#define ANISO_FAST_AVX
#define ANISO_FAST_AVX512
inline Isa cpu_isa() { return Isa::kBase; }
#endif

// The widest ISA the CPU has, capped by ANISO_FAST_CPU_ISA when it is set (an unknown value caps nothing).
inline Isa best_isa() {
  Isa isa = cpu_isa();
  if (const char* cap = std::getenv("ANISO_FAST_CPU_ISA")) {
    const Isa c = std::strcmp(cap, "base") == 0 ? Isa::kBase : std::strcmp(cap, "avx") == 0 ? Isa::kAvx : isa;
    if (static_cast<int>(c) < static_cast<int>(isa)) isa = c;
  }
  return isa;
}
inline bool cpu_has_avx_fma() { return best_isa() != Isa::kBase; }
