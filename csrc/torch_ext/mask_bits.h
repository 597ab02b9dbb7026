// The packed 1-bit masks' byte helpers, shared by the CPU kernels of the
// quantizer and of the learnable max_value (one bit an element, element 0 of
// a byte in bit 0; docs/quantizer.md, "The packed gradient mask").
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace torch_ext {
namespace mask_bits {

// An unsigned integer of the same width as scalar_t: the backward selects raw
// bits, so -0.0, NaN payloads and infinities of grad_y pass unchanged.
template <typename scalar_t>
using bits_t = std::conditional_t<
    sizeof(scalar_t) == 2, uint16_t,
    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;

// Byte v of a mask -> 8 flag bytes (0 or 1), element 0 in the lowest byte.
struct UnpackTable {
  uint64_t flags[256];
  constexpr UnpackTable() : flags() {
    for (int v = 0; v < 256; ++v) {
      uint64_t f = 0;
      for (int i = 0; i < 8; ++i) {
        f |= static_cast<uint64_t>((v >> i) & 1) << (8 * i);
      }
      flags[v] = f;
    }
  }
};
inline constexpr UnpackTable kUnpack;

// 8 flag bytes (0 or 1) -> one mask byte: the multiply moves the low bit of
// byte i to bit 56 + i, with no carries between them.
inline uint8_t pack_flags(const uint8_t* flags) {
  uint64_t f;
  std::memcpy(&f, flags, 8);
  return static_cast<uint8_t>((f * 0x0102040810204080ULL) >> 56);
}

}  // namespace mask_bits
}  // namespace torch_ext
