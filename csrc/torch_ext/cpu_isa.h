// Which per-ISA copy of the CPU loops to run. Each kernel file compiles its
// loops for the baseline x86-64 ISA and for wider ones, and runs the widest
// the CPU has, capped by TORCH_EXT_CPU_ISA=baseline|avx2|avx512 (so that tests
// can hold every copy to the same results on one machine, and benchmarks can
// compare them). The variable is read at each call; unset or empty means no
// cap, and any other value is refused (ValueError in Python) by the operator
// that reads it, rather than silently running without a cap.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

namespace torch_ext {

enum IsaCap : int { kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

inline int cpu_isa_cap() {
  const char* env = std::getenv("TORCH_EXT_CPU_ISA");
  if (env == nullptr || env[0] == '\0') {
    return kIsaAvx512;
  }
  if (std::strcmp(env, "baseline") == 0) {
    return kIsaBaseline;
  }
  if (std::strcmp(env, "avx2") == 0) {
    return kIsaAvx2;
  }
  TORCH_CHECK_VALUE(
      std::strcmp(env, "avx512") == 0, "TORCH_EXT_CPU_ISA='", env,
      "' is not one of baseline, avx2, avx512 (unset it to run the widest copy the CPU has)");
  return kIsaAvx512;
}

// The widest copy to run: what the CPU has (AVX2 with POPCNT; AVX-512 F, BW,
// DQ and VL), under the cap. A kernel that needs more (the packed
// convolution's VPOPCNTDQ) checks that itself.
inline int cpu_isa() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const int has =
      (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
       __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
          ? kIsaAvx512
          : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") ? kIsaAvx2 : kIsaBaseline);
  return std::min(cpu_isa_cap(), has);
#else
  return kIsaBaseline;
#endif
}

}  // namespace torch_ext
