// The scalar math of docs/quantizer.md, shared by the CPU and the CUDA kernels so that
// the two cannot drift apart. Every function here is C10_HOST_DEVICE.
//
// Each step is one correctly rounded IEEE operation: on the device we call the
// _rn intrinsics, which nvcc never contracts into an FMA nor replaces by an
// approximate division; on the host the files are compiled with
// -ffp-contract=off (see setup.py / CMakeLists.txt; the .cu files' host code
// through nvcc -Xcompiler) for the same reason.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace torch_ext {
namespace formula {

// The compute type T of docs/quantizer.md: double for float64, float for everything
// narrower (float16, bfloat16, float32).
template <typename scalar_t>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};
template <typename scalar_t>
using compute_t = typename ComputeType<scalar_t>::type;

C10_HOST_DEVICE inline float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
C10_HOST_DEVICE inline double div_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
C10_HOST_DEVICE inline double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
C10_HOST_DEVICE inline float floor_(float a) {
#ifdef __CUDA_ARCH__
  return ::floorf(a);
#else
  return std::floor(a);
#endif
}
C10_HOST_DEVICE inline double floor_(double a) {
#ifdef __CUDA_ARCH__
  return ::floor(a);
#else
  return std::floor(a);
#endif
}

// The per-call constants, converted to T once on the host.
template <typename T>
struct Params {
  T max_value;  // m = T(max_value)
  T levels;     // n = T(2^bit - 1)
  bool clip_only;  // bit == 32: full precision, clip only
};

template <typename T>
inline Params<T> make_params(int64_t bit, double max_value) {
  Params<T> p;
  p.max_value = static_cast<T>(max_value);
  p.clip_only = bit == 32;
  // For bit == 32 `levels` is never read; keep it finite anyway.
  p.levels = static_cast<T>(p.clip_only ? 1.0 : std::ldexp(1.0, static_cast<int>(bit)) - 1.0);
  return p;
}

// c = min(max(x, 0), m): NaN stays NaN (neither comparison holds),
// -inf -> 0, +inf -> m, and -0.0 stays -0.0 (as torch.clamp leaves it).
template <typename T>
C10_HOST_DEVICE inline T clip(T x, T m) {
  return x < T(0) ? T(0) : (x > m ? m : x);
}

// level(c) = floor((c / m) * n + 0.5) and
// y = (level(clip(x, m)) / n) * m, each step rounded to T (bit < 32).
// Branch-free, so that a loop over it vectorizes.
template <typename T>
C10_HOST_DEVICE inline T level(T c, T m, T n) {
  return floor_(add_rn(mul_rn(div_rn(c, m), n), T(0.5)));
}
template <typename T>
C10_HOST_DEVICE inline T quantize_levels(T x, T m, T n) {
  return mul_rn(div_rn(level(clip(x, m), m, n), n), m);
}

// The integer code of x, level(clip(x, m)) in 0..n, as a T (bit < 32):
// torch_ext.quantize_to_codes' value. NaN gives 0 (a code has no NaN).
template <typename T>
C10_HOST_DEVICE inline T code(T x, T m, T n) {
  const T l = level(clip(x, m), m, n);
  return l == l ? l : T(0);
}

// The whole forward of docs/quantizer.md, bit == 32 included.
template <typename T>
C10_HOST_DEVICE inline T quantize(T x, const Params<T>& p) {
  return p.clip_only ? clip(x, p.max_value) : quantize_levels(x, p.max_value, p.levels);
}

// One NaN for every NaN result, the default quiet NaN of each format: CPU
// arithmetic keeps a NaN's sign and payload while CUDA arithmetic and
// conversions write their own canonical NaN, so without this the two
// devices would write different bits for NaN inputs.
template <typename scalar_t>
struct NaNBits;
template <>
struct NaNBits<float> {
  using type = uint32_t;
  static constexpr uint32_t value = 0x7FC00000u;
  static constexpr uint32_t exponent = 0x7F800000u;
};
template <>
struct NaNBits<double> {
  using type = uint64_t;
  static constexpr uint64_t value = 0x7FF8000000000000ull;
  static constexpr uint64_t exponent = 0x7FF0000000000000ull;
};
template <>
struct NaNBits<c10::Half> {
  using type = uint16_t;
  static constexpr uint16_t value = 0x7E00u;
  static constexpr uint16_t exponent = 0x7C00u;
};
template <>
struct NaNBits<c10::BFloat16> {
  using type = uint16_t;
  static constexpr uint16_t value = 0x7FC0u;
  static constexpr uint16_t exponent = 0x7F80u;
};

// Whether the bits of a scalar_t are a NaN (magnitude above infinity's).
template <typename scalar_t>
C10_HOST_DEVICE inline bool is_nan_bits(typename NaNBits<scalar_t>::type bits) {
  using B = typename NaNBits<scalar_t>::type;
  const B magnitude = bits & static_cast<B>(~(static_cast<B>(1) << (8 * sizeof(B) - 1)));
  return magnitude > NaNBits<scalar_t>::exponent;
}

// The bits of y, with any NaN replaced by NaNBits<scalar_t>::value.
template <typename scalar_t>
C10_HOST_DEVICE inline typename NaNBits<scalar_t>::type canonical_nan(typename NaNBits<scalar_t>::type bits) {
  return is_nan_bits<scalar_t>(bits) ? NaNBits<scalar_t>::value : bits;
}

// The straight-through gradient passes where 0 < x < m, compared in T;
// NaN fails both comparisons.
template <typename T>
C10_HOST_DEVICE inline bool passes_gradient(T x, T m) {
  return (x > T(0)) & (x < m);
}

}  // namespace formula
}  // namespace torch_ext
