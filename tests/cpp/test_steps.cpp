// The step code that the CUDA kernels share with the host (steps.h,
// storage.h), tested here on the host, where no GPU is needed:
//   - ValueSteps, the GPU's form (compare x in the compute type, select the
//     result's bits), gives the bits of Steps, the CPU's form (compare keys),
//     for every float16 and bfloat16 pattern;
//   - the k-ary search that one warp runs a round of at a time (KarySearch,
//     32 candidates a round) lands on the thresholds of the host's binary
//     search, for every level of 1 to 4 bits, in float16, bfloat16, float32
//     and float64, over max_values from subnormal to huge.
// The CUDA kernels themselves are held to the CPU's bits by
// tests/test_steps_cuda.py on a GPU.
#include <torch_ext/steps.h>
#include <torch_ext/storage.h>

#include "catch_compat.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using torch_ext::storage::Storage;
namespace steps = torch_ext::steps;

const std::vector<double> kMaxValues = {2.0, 1.0, 3.0, 6.0, 0.1, 0.7, 1.0 / 3.0, 1e-3, 1e-6, 1e-30,
                                        1.7e4, 65504.0, 65520.0, 1e5, 3e38};

template <typename scalar_t, int kLevels>
void check_every_pattern(double max_value) {
  using S = Storage<scalar_t>;
  using T = float;
  const T m = static_cast<T>(max_value);
  const auto keys = steps::make_steps<scalar_t, kLevels, S>(m);
  const auto values = steps::make_value_steps<scalar_t, S, kLevels>(m);
  int mismatches = 0;
  for (uint32_t b = 0; b < 65536; b += 8) {
    uint16_t bits[8];
    T x[8];
    uint16_t y[8];
    for (int j = 0; j < 8; ++j) {
      bits[j] = static_cast<uint16_t>(b + j);
      x[j] = S::load(bits[j]);
    }
    values.apply(x, y);
    for (int j = 0; j < 8; ++j) {
      if (y[j] != keys(bits[j])) {
        ++mismatches;
      }
    }
  }
  INFO("levels " << kLevels << ", max_value " << max_value);
  CHECK(mismatches == 0);
}

template <typename scalar_t, int kLevels>
void check_kary_search(double max_value) {
  using S = Storage<scalar_t>;
  using T = torch_ext::formula::compute_t<scalar_t>;
  using B = torch_ext::mask_bits::bits_t<scalar_t>;
  const T m = static_cast<T>(max_value);
  const T n = static_cast<T>(kLevels);
  const auto binary = steps::make_value_steps<scalar_t, S, kLevels>(m);
  for (int k = 1; k <= kLevels; ++k) {
    const steps::AtLeastLevel<scalar_t, S, T> pred{m, n, static_cast<T>(k)};
    const B at = steps::least_bits_kary<scalar_t, 32>(B(0), pred);
    INFO("level " << k << " of " << kLevels << ", max_value " << max_value);
    CHECK(S::load(at) == binary.at[k - 1]);
    CHECK(steps::result_at<scalar_t, S>(at, m, n) == binary.value[k]);
    // The least such pattern: the one below it is still at a lower level.
    CHECK_FALSE(pred(static_cast<B>(at - 1)));
  }
}

template <typename scalar_t>
void check_all_levels(double max_value) {
  check_kary_search<scalar_t, 1>(max_value);
  check_kary_search<scalar_t, 3>(max_value);
  check_kary_search<scalar_t, 7>(max_value);
  check_kary_search<scalar_t, 15>(max_value);
}

}  // namespace

TEST_CASE("ValueSteps equals Steps for every float16 pattern", "[steps]") {
  for (double m : kMaxValues) {
    check_every_pattern<c10::Half, 1>(m);
    check_every_pattern<c10::Half, 3>(m);
    check_every_pattern<c10::Half, 7>(m);
    check_every_pattern<c10::Half, 15>(m);
  }
}

TEST_CASE("ValueSteps equals Steps for every bfloat16 pattern", "[steps]") {
  for (double m : kMaxValues) {
    check_every_pattern<c10::BFloat16, 1>(m);
    check_every_pattern<c10::BFloat16, 3>(m);
    check_every_pattern<c10::BFloat16, 7>(m);
    check_every_pattern<c10::BFloat16, 15>(m);
  }
}

TEST_CASE("The 32-ary search finds the binary search's thresholds", "[steps]") {
  for (double m : kMaxValues) {
    check_all_levels<c10::Half>(m);
    check_all_levels<c10::BFloat16>(m);
    check_all_levels<float>(m);
    check_all_levels<double>(m);
  }
}

TEST_CASE("A k-ary round keeps the passing candidate and the failing one below it", "[steps]") {
  // pred(u) = u >= 1000 over (0, 4096]: every fanout lands on 1000.
  for (int fanout : {2, 3, 7, 32}) {
    steps::KarySearch<uint32_t> s{0u, 4096u};
    int rounds = 0;
    while (!s.done()) {
      int first = fanout - 1;
      for (int i = 0; i < fanout; ++i) {
        if (s.candidate(i, fanout) >= 1000u) {
          first = i;
          break;
        }
      }
      s.narrow(first, fanout);
      REQUIRE(s.lo < 1000u);
      REQUIRE(s.hi >= 1000u);
      REQUIRE(++rounds < 64);
    }
    INFO("fanout " << fanout);
    CHECK(s.hi == 1000u);
  }
}
