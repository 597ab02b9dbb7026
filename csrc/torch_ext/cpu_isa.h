// Which per-ISA copy of the CPU loops to run. Each kernel file compiles its
// loops for the baseline x86-64 ISA and for wider ones, and runs the widest
// the CPU has, capped by TORCH_EXT_CPU_ISA=baseline|avx2|avx512 (so that tests
// can hold every copy to the same results on one machine, and benchmarks can
// compare them). The variable is read at each call.
#pragma once

#include <cstdlib>
#include <cstring>

namespace torch_ext {

enum IsaCap : int { kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

inline int cpu_isa_cap() {
  const char* env = std::getenv("TORCH_EXT_CPU_ISA");
  if (env == nullptr) {
    return kIsaAvx512;
  }
  if (std::strcmp(env, "baseline") == 0) {
    return kIsaBaseline;
  }
  if (std::strcmp(env, "avx2") == 0) {
    return kIsaAvx2;
  }
  return kIsaAvx512;
}

}  // namespace torch_ext
