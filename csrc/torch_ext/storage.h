// Storage type <-> compute type, through the bits, for the CPU and the CUDA
// kernels alike: load(bits) -> T and store(T) -> the bits of the result
// rounded to scalar_t, any NaN written as the one NaN of formula.h.
//
// For float16 and bfloat16 these are the exact round-to-nearest-even
// conversions c10 makes, written as integer operations and selects with no
// branch and no call: the CPU loops vectorize under every ISA (c10's own
// branch on NaN or go one value at a time), and steps.h finds its thresholds
// with the same conversions on the host (fixed max_value) and on the device
// (a max_value read from a tensor), so both find the same steps.
#pragma once

#include "torch_ext/formula.h"
#include "torch_ext/mask_bits.h"

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

namespace torch_ext {
namespace storage {

using mask_bits::bits_t;

template <typename To, typename From>
C10_HOST_DEVICE C10_ALWAYS_INLINE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

template <typename scalar_t>
struct Storage {
  using B = bits_t<scalar_t>;
  using T = formula::compute_t<scalar_t>;
  static C10_HOST_DEVICE C10_ALWAYS_INLINE T load(B b) {
    return bit_cast<scalar_t>(b);
  }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE B store(T r) {
    return formula::canonical_nan<scalar_t>(bit_cast<B>(static_cast<scalar_t>(r)));
  }
};

template <>
struct Storage<c10::BFloat16> {
  using B = uint16_t;
  using T = float;
  static C10_HOST_DEVICE C10_ALWAYS_INLINE float load(B b) {
    return bit_cast<float>(static_cast<uint32_t>(b) << 16);
  }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE B store(float r) {
    const uint32_t u = bit_cast<uint32_t>(r);
    // Round to nearest even on the 16 dropped bits (a carry into the exponent
    // is the right result, up to infinity).
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<B>(formula::is_nan_bits<float>(u) ? uint32_t{formula::NaNBits<c10::BFloat16>::value} : rounded);
  }
};

template <>
struct Storage<c10::Half> {
  using B = uint16_t;
  using T = float;
  static C10_HOST_DEVICE C10_ALWAYS_INLINE float load(B h) {
    // Exponent and mantissa moved under float's, the exponent rebased by
    // 127 - 15; infinities and NaNs (exponent 31) get the rest of the way to
    // 255, and subnormals (exponent 0) are renormalised by one exact float
    // subtraction of 2^-14.
    const uint32_t magnitude = static_cast<uint32_t>(h & 0x7FFFu) << 13;
    const uint32_t exponent = magnitude & 0x0F800000u;
    const uint32_t normal = magnitude + ((127u - 15u) << 23);
    const uint32_t special = normal + ((128u - 16u) << 23);
    const uint32_t subnormal =
        bit_cast<uint32_t>(formula::add_rn(bit_cast<float>(normal + (1u << 23)), -bit_cast<float>((127u - 14u) << 23)));
    const uint32_t bits = exponent == 0x0F800000u ? special : (exponent == 0 ? subnormal : normal);
    return bit_cast<float>(bits | (static_cast<uint32_t>(h & 0x8000u) << 16));
  }
  static C10_HOST_DEVICE C10_ALWAYS_INLINE B store(float r) {
    const uint32_t u = bit_cast<uint32_t>(r);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    // |r| >= 65520 rounds to infinity; NaN is the one NaN.
    const uint32_t overflow = a > 0x7F800000u ? uint32_t{formula::NaNBits<c10::Half>::value} : 0x7C00u;
    // |r| < 2^-14: the float addition of 0.5 rounds the value to a multiple
    // of 2^-24 (the subnormal step of float16), nearest even, in the FPU.
    const uint32_t small = bit_cast<uint32_t>(formula::add_rn(bit_cast<float>(a), 0.5f)) - 0x3F000000u;
    // Normal: rebase the exponent and round the 13 dropped bits to nearest
    // even (a carry into the exponent is the right result).
    const uint32_t normal = (a + ((15u - 127u) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    const uint32_t magnitude = a >= 0x477FF000u ? overflow : (a < 0x38800000u ? small : normal);
    const bool nan = a > 0x7F800000u;
    return static_cast<B>(nan ? magnitude : (magnitude | sign));
  }
};

}  // namespace storage
}  // namespace torch_ext
