// The three forms of the quantizer's forward on the GPU, each bit-identical
// to formula.h (docs/quantizer.md, "How the GPU computes it"):
//
//   StepsForm    1 to 4 bits: compare x with the thresholds of steps.h
//                (ValueSteps) and select the result's bits; no division.
//                StepsForm<_, n> serves n = 2^bit - 1 levels (float64
//                takes the formula: its kernels are compiled once, not four
//                times, for a type that GPUs train in seldom).
//   ClipForm     bit == 32: y = clip(x, m), selects only.
//   FormulaForm  5 to 16 bits: the formula itself, two IEEE divisions.
//
// Each takes a thread's elements as values of the compute type T (exact
// widenings of the storage type) and as bits, and writes the result's bits,
// any NaN as formula.h's one NaN. The fixed operator builds its form on the
// host, once a call, and passes it as a kernel argument; the learnable
// operator builds it on the device from the max_value tensor, once a block,
// in shared memory (build_form), with no host synchronisation.
#pragma once

#include "tiles.cuh"

#include "torch_ext/formula.h"
#include "torch_ext/steps.h"
#include "torch_ext/storage.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace torch_ext {
namespace cuda_forms {

using mask_bits::bits_t;
using storage::Storage;

template <typename scalar_t, int kLevels>
struct StepsForm {
  using Scalar = scalar_t;
  using T = formula::compute_t<scalar_t>;
  using B = bits_t<scalar_t>;
  steps::ValueSteps<scalar_t, kLevels> steps;

  __device__ __forceinline__ T max_value() const {
    return steps.m;
  }
  template <int N>
  __device__ __forceinline__ void apply(const T (&x)[N], const B (&)[N], B (&y)[N]) const {
    steps.apply(x, y);
  }
};

template <typename scalar_t>
struct ClipForm {
  using Scalar = scalar_t;
  using T = formula::compute_t<scalar_t>;
  using B = bits_t<scalar_t>;
  T m;
  B max_bits;  // m rounded to the storage type

  __device__ __forceinline__ T max_value() const {
    return m;
  }
  // clip(x, m) rounded to the storage type is +0 below 0, m's bits above m,
  // and x's own bits in between (-0 stays -0).
  template <int N>
  __device__ __forceinline__ void apply(const T (&x)[N], const B (&xb)[N], B (&y)[N]) const {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const B c = x[j] < T(0) ? B(0) : (x[j] > m ? max_bits : xb[j]);
      y[j] = x[j] != x[j] ? B{formula::NaNBits<scalar_t>::value} : c;
    }
  }
};

template <typename scalar_t>
struct FormulaForm {
  using Scalar = scalar_t;
  using T = formula::compute_t<scalar_t>;
  using B = bits_t<scalar_t>;
  T m;
  T n;

  __device__ __forceinline__ T max_value() const {
    return m;
  }
  template <int N>
  __device__ __forceinline__ void apply(const T (&x)[N], const B (&)[N], B (&y)[N]) const {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      y[j] = Storage<scalar_t>::store(formula::quantize_levels(x[j], m, n));
    }
  }
};

// f(static_cast<F*>(nullptr)) with the form F that serves `bit` for scalar_t.
template <typename scalar_t, typename F>
void with_form(int64_t bit, F&& f) {
  if (bit == 32) {
    f(static_cast<ClipForm<scalar_t>*>(nullptr));
    return;
  }
  if constexpr (!std::is_same<scalar_t, double>::value) {
    switch (bit) {
      case 1:
        f(static_cast<StepsForm<scalar_t, 1>*>(nullptr));
        return;
      case 2:
        f(static_cast<StepsForm<scalar_t, 3>*>(nullptr));
        return;
      case 3:
        f(static_cast<StepsForm<scalar_t, 7>*>(nullptr));
        return;
      case 4:
        f(static_cast<StepsForm<scalar_t, 15>*>(nullptr));
        return;
      default:
        break;
    }
  }
  f(static_cast<FormulaForm<scalar_t>*>(nullptr));
}

// Vector k of a thread's tile (kVecElems elements of `in`, as bits): its
// values in T in `x` (exact widenings, for the masks) and the form's result
// bits in the same vector of `out`. The one place every kernel quantizes.
template <int kVecElems, typename Form, typename B, typename T>
__device__ __forceinline__ void quantize_vector(const Form& form, const B* in, B* out, int k, T (&x)[kVecElems]) {
  using S = Storage<typename Form::Scalar>;
  const B(&vin)[kVecElems] = *reinterpret_cast<const B(*)[kVecElems]>(in + k * kVecElems);
  B(&vout)[kVecElems] = *reinterpret_cast<B(*)[kVecElems]>(out + k * kVecElems);
#pragma unroll
  for (int j = 0; j < kVecElems; ++j) {
    x[j] = S::load(vin[j]);
  }
  form.apply(x, vin, vout);
}

// A thread's part of tile t of a forward: x loaded, quantized one vector at a
// time by `form` (a thread's 16 or 32 values and results would not all fit
// in registers at full occupancy), y stored. After vector k is quantized,
// per_vector(k, values) is called with its values in T, for the masks (every
// lane of the warp calls it, as cuda_tiles::store_mask_bits needs). The tile
// body of both operators' forward kernels.
template <bool kFull, typename Form, typename scalar_t, typename PerVector>
__device__ __forceinline__ void quantize_tile(
    const Form& form, const scalar_t* x, scalar_t* y, int64_t t, int64_t numel, PerVector&& per_vector) {
  using Tl = cuda_tiles::Tile<scalar_t>;
  using B = bits_t<scalar_t>;
  B in[Tl::kThreadElems];
  cuda_tiles::load_tile<kFull>(x, t, numel, in);
  B out[Tl::kThreadElems];
#pragma unroll
  for (int k = 0; k < cuda_tiles::kVecs; ++k) {
    formula::compute_t<scalar_t> xv[Tl::kVecElems];
    quantize_vector<Tl::kVecElems>(form, in, out, k, xv);
    per_vector(k, xv);
  }
  cuda_tiles::store_tile<kFull>(y, t, numel, out);
}

// ---------------------------------------------------------------------------
// On the host (the fixed operator): m already in T.

template <typename scalar_t, int kLevels>
StepsForm<scalar_t, kLevels> make_form(StepsForm<scalar_t, kLevels>*, formula::compute_t<scalar_t> m, int) {
  return {steps::make_value_steps<scalar_t, Storage<scalar_t>, kLevels>(m)};
}
template <typename scalar_t>
ClipForm<scalar_t> make_form(ClipForm<scalar_t>*, formula::compute_t<scalar_t> m, int) {
  return {m, Storage<scalar_t>::store(m)};
}
template <typename scalar_t>
FormulaForm<scalar_t> make_form(FormulaForm<scalar_t>*, formula::compute_t<scalar_t> m, int levels) {
  return {m, static_cast<formula::compute_t<scalar_t>>(levels)};
}

// ---------------------------------------------------------------------------
// On the device (the learnable operator): every thread of the block calls
// build_form with the same m, then __syncthreads() before reading the form.

// Each level's threshold is searched by one warp, warps taking levels in
// turn: a 32-ary search (steps::KarySearch), one candidate a lane, so a level
// takes 7 rounds of the formula for float32 (3 for 16-bit types) instead of
// the host's 31; the rounds land on the same bits as the host's search.
template <typename scalar_t, int kLevels>
__device__ void build_form(StepsForm<scalar_t, kLevels>& f, formula::compute_t<scalar_t> m, int) {
  using T = formula::compute_t<scalar_t>;
  using B = bits_t<scalar_t>;
  using S = Storage<scalar_t>;
  constexpr int kFanout = 32;
  const int lane = threadIdx.x % kFanout;
  const int warps = blockDim.x / kFanout;
  const T n = static_cast<T>(kLevels);
  for (int k = threadIdx.x / kFanout + 1; k <= kLevels; k += warps) {
    const steps::AtLeastLevel<scalar_t, S, T> pred{m, n, static_cast<T>(k)};
    steps::KarySearch<B> search{B(0), formula::NaNBits<scalar_t>::exponent};
    while (!search.done()) {
      // The last candidate is hi, where the predicate holds (m is finite: its
      // level is n there); bit 31 says so even if a future m broke that.
      const unsigned passing = __ballot_sync(0xFFFFFFFFu, pred(search.candidate(lane, kFanout))) | (1u << 31);
      search.narrow(__ffs(passing) - 1, kFanout);
    }
    if (lane == 0) {
      f.steps.at[k - 1] = S::load(search.hi);
      f.steps.value[k] = steps::result_at<scalar_t, S>(search.hi, m, n);
    }
  }
  if (threadIdx.x == 0) {
    f.steps.m = m;
    f.steps.value[0] = steps::result_at<scalar_t, S>(B(0), m, n);
  }
}

template <typename scalar_t>
__device__ void build_form(ClipForm<scalar_t>& f, formula::compute_t<scalar_t> m, int) {
  if (threadIdx.x == 0) {
    f.m = m;
    f.max_bits = Storage<scalar_t>::store(m);
  }
}

template <typename scalar_t>
__device__ void build_form(FormulaForm<scalar_t>& f, formula::compute_t<scalar_t> m, int levels) {
  if (threadIdx.x == 0) {
    f.m = m;
    f.n = static_cast<formula::compute_t<scalar_t>>(levels);
  }
}

}  // namespace cuda_forms
}  // namespace torch_ext
