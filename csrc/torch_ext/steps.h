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
// The CUDA kernels use the same steps in the compute type instead of on
// keys (ValueSteps below: a GPU compares floats as fast as integers, and a
// bfloat16 or float16 value widens to float exactly). The fixed
// operator finds them on the host, once a call; the learnable one on the
// device from the max_value tensor, each level searched by one warp with the
// k-ary search below (KarySearch), which lands on the same bit pattern as the
// binary search.
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

// Full unrolling of the loops over a thread's elements and the levels: nvcc
// needs it to keep them in registers; GCC's vectorizer does not.
#if defined(__CUDACC__)
#define TORCH_EXT_UNROLL _Pragma("unroll")
#else
#define TORCH_EXT_UNROLL
#endif

namespace torch_ext {
namespace steps {

template <typename scalar_t>
using key_t = std::make_signed_t<mask_bits::bits_t<scalar_t>>;

template <typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE key_t<scalar_t> key(mask_bits::bits_t<scalar_t> b) {
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

  C10_HOST_DEVICE C10_ALWAYS_INLINE bool passes(B x) const {
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
  C10_HOST_DEVICE C10_ALWAYS_INLINE B operator()(B x) const {
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

  C10_HOST_DEVICE C10_ALWAYS_INLINE B operator()(B x) const {
    const K k_x = key<scalar_t>(x);
    B y = k_x < K(-1) ? B(0) : x;  // key(-0) == -1
    y = k_x >= above_max ? max_bits : y;
    return formula::is_nan_bits<scalar_t>(x) ? B{formula::NaNBits<scalar_t>::value} : y;
  }
};

// Least u in (lo, +inf] with pred(u), over the bit patterns of non-negative
// values of scalar_t; pred(+inf) must hold and pred(lo) must not.
template <typename scalar_t, typename Pred>
C10_HOST_DEVICE mask_bits::bits_t<scalar_t> least_bits(mask_bits::bits_t<scalar_t> lo, Pred pred) {
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
C10_HOST_DEVICE key_t<scalar_t> below_max_key(T m) {
  using B = mask_bits::bits_t<scalar_t>;
  return key<scalar_t>(least_bits<scalar_t>(B(0), [&](B u) { return Storage::load(u) >= m; }));
}

template <typename scalar_t, typename Storage, typename T>
C10_HOST_DEVICE Clip<scalar_t> make_clip(T m) {
  using B = mask_bits::bits_t<scalar_t>;
  Clip<scalar_t> c;
  c.below_max = below_max_key<scalar_t, Storage>(m);
  c.above_max = key<scalar_t>(least_bits<scalar_t>(B(0), [&](B u) { return Storage::load(u) > m; }));
  c.max_bits = Storage::store(m);
  return c;
}

// Whether the formula's level at the bits u reaches k: the predicate of every
// threshold search (monotone in u over the non-negative values; false at +0,
// true at +inf).
template <typename scalar_t, typename Storage, typename T>
struct AtLeastLevel {
  T m;
  T n;
  T k;
  C10_HOST_DEVICE C10_ALWAYS_INLINE bool operator()(mask_bits::bits_t<scalar_t> u) const {
    return formula::level(formula::clip(Storage::load(u), m), m, n) >= k;
  }
};

// The bits of the formula's result at the bits u (the value of a step).
template <typename scalar_t, typename Storage, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE mask_bits::bits_t<scalar_t> result_at(mask_bits::bits_t<scalar_t> u, T m, T n) {
  return Storage::store(formula::quantize_levels(Storage::load(u), m, n));
}

// The steps of levels n = kLevels and clip m (finite, > 0: the operator's
// argument checks refuse the rest), for values of scalar_t computed in T.
// Storage::load(bits) -> T and Storage::store(T) -> bits are the kernel's
// exact conversions.
template <typename scalar_t, int kLevels, typename Storage, typename T>
C10_HOST_DEVICE Steps<scalar_t, kLevels> make_steps(T m) {
  using B = mask_bits::bits_t<scalar_t>;
  const T n = static_cast<T>(kLevels);
  Steps<scalar_t, kLevels> s;
  s.value[0] = result_at<scalar_t, Storage>(B(0), m, n);
  B lo = 0;  // level(+0) == 0
  for (int k = 1; k <= kLevels; ++k) {
    const B at = least_bits<scalar_t>(lo, AtLeastLevel<scalar_t, Storage, T>{m, n, static_cast<T>(k)});
    s.threshold[k - 1] = key<scalar_t>(at);
    s.value[k] = result_at<scalar_t, Storage>(at, m, n);
    // The next threshold lies above this one (or on it, if one value skips a
    // level): search on from the value just below.
    lo = at - 1;
  }
  s.below_max = below_max_key<scalar_t, Storage>(m);
  return s;
}

// ---------------------------------------------------------------------------
// The pieces the CUDA kernels share with the host.

// A k-ary search for the least u in (lo, hi] with pred(u), given !pred(lo)
// and pred(hi): each round tests `fanout` evenly spaced candidates, the last
// of them hi, and keeps the span between the last failing and the first
// passing one. A warp runs one round as one test a lane (32-ary: 7 rounds
// over float32's patterns instead of 31); least_bits_kary runs the same
// rounds one candidate at a time on the host, where the tests compare it with
// least_bits.
template <typename B>
struct KarySearch {
  B lo;
  B hi;
  C10_HOST_DEVICE C10_ALWAYS_INLINE bool done() const {
    return hi - lo <= 1;
  }
  C10_HOST_DEVICE C10_ALWAYS_INLINE B step(int fanout) const {
    return static_cast<B>((hi - lo + static_cast<B>(fanout - 1)) / static_cast<B>(fanout));
  }
  // Candidate i (0-based) of this round, capped at hi.
  C10_HOST_DEVICE C10_ALWAYS_INLINE B candidate(int i, int fanout) const {
    const B c = static_cast<B>(lo + step(fanout) * static_cast<B>(i + 1));
    return c > hi ? hi : c;
  }
  // first: the least i whose candidate passes (candidate fanout - 1 is hi, which does).
  C10_HOST_DEVICE C10_ALWAYS_INLINE void narrow(int first, int fanout) {
    const B c = candidate(first, fanout);
    lo = first == 0 ? lo : static_cast<B>(lo + step(fanout) * static_cast<B>(first));
    hi = c;
  }
};

template <typename scalar_t, int kFanout, typename Pred>
mask_bits::bits_t<scalar_t> least_bits_kary(mask_bits::bits_t<scalar_t> lo, Pred pred) {
  KarySearch<mask_bits::bits_t<scalar_t>> s{lo, formula::NaNBits<scalar_t>::exponent};
  while (!s.done()) {
    int first = kFanout - 1;
    for (int i = 0; i < kFanout; ++i) {
      if (pred(s.candidate(i, kFanout))) {
        first = i;
        break;
      }
    }
    s.narrow(first, kFanout);
  }
  return s.hi;
}

// Up to 4 bits take the step form.
constexpr int kMaxStepLevels = 15;

// The steps in the compute type, for kLevels = 2^bit - 1 levels: at[k] is
// threshold k as a value of T (exact: the bits of a storage value), value[k]
// the bits of the result at level k. For x not NaN, x >= at[k] in T exactly
// when key(x) >= threshold[k] of Steps (thresholds are positive, so -0 and
// +0 fall below both ways).
template <typename scalar_t, int kLevels>
struct ValueSteps {
  static_assert(kLevels >= 1 && kLevels <= kMaxStepLevels, "1 to 4 bits");
  using B = mask_bits::bits_t<scalar_t>;
  using T = formula::compute_t<scalar_t>;
  T m;  // for the gradient gate, formula::passes_gradient
  T at[kLevels];
  B value[kLevels + 1];

  // The bits of the results for N values of x, level by level (so that each
  // threshold is read once for all N; every index is a constant, so on the
  // GPU a threshold is a constant-bank operand or a shared-memory load at a
  // fixed offset).
  template <int N>
  C10_HOST_DEVICE C10_ALWAYS_INLINE void apply(const T (&x)[N], B (&y)[N]) const {
TORCH_EXT_UNROLL
    for (int j = 0; j < N; ++j) {
      y[j] = value[0];
    }
TORCH_EXT_UNROLL
    for (int k = 0; k < kLevels; ++k) {
      const T t = at[k];
      const B v = value[k + 1];
TORCH_EXT_UNROLL
      for (int j = 0; j < N; ++j) {
        y[j] = x[j] >= t ? v : y[j];
      }
    }
TORCH_EXT_UNROLL
    for (int j = 0; j < N; ++j) {
      y[j] = x[j] != x[j] ? B{formula::NaNBits<scalar_t>::value} : y[j];
    }
  }
};

// ValueSteps for clip m (finite, > 0), found on the host by the binary search.
template <typename scalar_t, typename Storage, int kLevels, typename T>
ValueSteps<scalar_t, kLevels> make_value_steps(T m) {
  using B = mask_bits::bits_t<scalar_t>;
  const T n = static_cast<T>(kLevels);
  ValueSteps<scalar_t, kLevels> s{};
  s.m = m;
  s.value[0] = result_at<scalar_t, Storage>(B(0), m, n);
  B lo = 0;  // level(+0) == 0
  for (int k = 1; k <= kLevels; ++k) {
    const B at = least_bits<scalar_t>(lo, AtLeastLevel<scalar_t, Storage, T>{m, n, static_cast<T>(k)});
    s.at[k - 1] = Storage::load(at);
    s.value[k] = result_at<scalar_t, Storage>(at, m, n);
    lo = at - 1;  // as in make_steps: the next threshold is at or above this one
  }
  return s;
}

}  // namespace steps
}  // namespace torch_ext
