// The forward of docs/quantizer.md as the step function it is, for the CPU
// kernels of the 1- to 4-bit quantizers (Blueoil's widths are 1 and 2).
//
// Every step of the formula (clip, divide, multiply, add, floor) is monotone
// in x, so level(x) = floor((clip(x, m) / m) * n + 0.5) climbs from 0 at
// x <= 0 to n at x >= m, and y = (level / n) * m takes only n + 1 values.
// Both are found once a call, with the formula itself: threshold[k] is the
// least non-negative value of the storage type whose level is k + 1 (a binary
// search over the bit patterns from +0 to +inf, which order like the values),
// and value[k] is the formula's result there, rounded to the storage type.
// A kernel then compares x with n thresholds and selects a value, all in
// integers on the bits of x: the same bits as the formula for every x (x < 0
// and -0 lie below every threshold, x > m and +inf above them all; NaN comes
// out as the one NaN of formula.h), with no division and no conversion in the
// loop. The divisions had held the float32 forward to 1.5x the time of
// torch.relu, and the float16/bfloat16 conversions held bfloat16 to 3.7x.
//
// Comparisons on bits: an IEEE value's sign-magnitude bits b map to the
// signed integer key(b) = b ^ ((b >> (w - 1)) & 0x7F..F), which orders like
// the values (-0 just below +0); NaNs are handled apart.
#pragma once

#include "torch_ext/formula.h"
#include "torch_ext/mask_bits.h"

#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

namespace torch_ext {
namespace steps {

template <typename scalar_t>
using key_t = std::make_signed_t<mask_bits::bits_t<scalar_t>>;

template <typename scalar_t>
C10_ALWAYS_INLINE key_t<scalar_t> key(mask_bits::bits_t<scalar_t> b) {
  using K = key_t<scalar_t>;
  const K s = static_cast<K>(b);
  constexpr K kMagnitude = static_cast<K>(~(mask_bits::bits_t<scalar_t>(1) << (8 * sizeof(K) - 1)));
  return s ^ ((s >> (8 * sizeof(K) - 1)) & kMagnitude);
}

// The straight-through mask on the bits: formula::passes_gradient(x, m),
// 0 < x < m, is key(x) > 0 and key(x) < below_max (a NaN's key lies below 0
// or above every finite value's).
template <typename scalar_t>
struct PassGate {
  using B = mask_bits::bits_t<scalar_t>;
  using K = key_t<scalar_t>;
  K below_max;  // the key of the least value >= m

  C10_ALWAYS_INLINE bool passes(B x) const {
    const K k_x = key<scalar_t>(x);
    return (k_x > K(0)) & (k_x < below_max);
  }
};

template <typename scalar_t, int kLevels>
struct Steps : PassGate<scalar_t> {
  static_assert(kLevels >= 1, "at least one level above 0");
  using B = mask_bits::bits_t<scalar_t>;
  using K = key_t<scalar_t>;
  K threshold[kLevels];  // threshold[k]: key of the least x >= +0 whose level is k + 1
  B value[kLevels + 1];  // value[k]: the bits of the result at level k

  // The bits of the result for the bits of x.
  C10_ALWAYS_INLINE B operator()(B x) const {
    const K k_x = key<scalar_t>(x);
    B y = value[0];
    for (int k = 0; k < kLevels; ++k) {
      y = k_x >= threshold[k] ? value[k + 1] : y;
    }
    return formula::is_nan_bits<scalar_t>(x) ? B{formula::NaNBits<scalar_t>::value} : y;
  }
};

// bit == 32 (clip only) on the bits, for the types whose conversions cost
// more than the clip: y = min(max(x, 0), m) rounded to the storage type,
// which is x itself for 0 <= x <= m (and -0 stays -0).
template <typename scalar_t>
struct Clip : PassGate<scalar_t> {
  using B = mask_bits::bits_t<scalar_t>;
  using K = key_t<scalar_t>;
  K above_max;  // x > m exactly when key(x) >= above_max (x not NaN)
  B max_bits;   // m rounded to the storage type

  C10_ALWAYS_INLINE B operator()(B x) const {
    const K k_x = key<scalar_t>(x);
    B y = k_x < K(-1) ? B(0) : x;  // key(-0) == -1
    y = k_x >= above_max ? max_bits : y;
    return formula::is_nan_bits<scalar_t>(x) ? B{formula::NaNBits<scalar_t>::value} : y;
  }
};

// Least u in (lo, +inf] with pred(u), over the bit patterns of non-negative
// values of scalar_t; pred(+inf) must hold and pred(lo) must not.
template <typename scalar_t, typename Pred>
mask_bits::bits_t<scalar_t> least_bits(mask_bits::bits_t<scalar_t> lo, Pred pred) {
  using B = mask_bits::bits_t<scalar_t>;
  B hi = formula::NaNBits<scalar_t>::exponent;
  while (hi - lo > 1) {
    const B mid = lo + (hi - lo) / 2;
    if (pred(mid)) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return hi;
}

// The key of the least value of scalar_t >= m (PassGate::below_max).
template <typename scalar_t, typename Storage, typename T>
key_t<scalar_t> below_max_key(T m) {
  using B = mask_bits::bits_t<scalar_t>;
  return key<scalar_t>(least_bits<scalar_t>(B(0), [&](B u) { return Storage::load(u) >= m; }));
}

template <typename scalar_t, typename Storage, typename T>
Clip<scalar_t> make_clip(T m) {
  using B = mask_bits::bits_t<scalar_t>;
  Clip<scalar_t> c;
  c.below_max = below_max_key<scalar_t, Storage>(m);
  c.above_max = key<scalar_t>(least_bits<scalar_t>(B(0), [&](B u) { return Storage::load(u) > m; }));
  c.max_bits = Storage::store(m);
  return c;
}

// The steps of levels n = kLevels and clip m (finite, > 0: the operator's
// argument checks refuse the rest), for values of scalar_t computed in T.
// Storage::load(bits) -> T and Storage::store(T) -> bits are the kernel's
// exact conversions.
template <typename scalar_t, int kLevels, typename Storage, typename T>
Steps<scalar_t, kLevels> make_steps(T m) {
  using B = mask_bits::bits_t<scalar_t>;
  const T n = static_cast<T>(kLevels);
  const auto level = [&](B u) { return formula::level(formula::clip(Storage::load(u), m), m, n); };
  Steps<scalar_t, kLevels> s;
  s.value[0] = Storage::store(formula::quantize_levels(T(0), m, n));
  B lo = 0;  // level(+0) == 0
  for (int k = 1; k <= kLevels; ++k) {
    const B at = least_bits<scalar_t>(lo, [&](B u) { return level(u) >= static_cast<T>(k); });
    s.threshold[k - 1] = key<scalar_t>(at);
    s.value[k] = Storage::store(formula::quantize_levels(Storage::load(at), m, n));
    // The next threshold lies above this one (or on it, if one value skips a
    // level): search on from the value just below.
    lo = at - 1;
  }
  s.below_max = below_max_key<scalar_t, Storage>(m);
  return s;
}

}  // namespace steps
}  // namespace torch_ext
