// What the CPU kernel files of the packed family share (internal; the public
// API is csrc/torch_ext/packed.h, the schemas csrc/ops/packed.cpp):
//   packed_checks.cpp             the argument checks
//   packed_conv_kernel.cpp        the convolution (portable and AVX2 copies),
//                                 its operators and their registration
//   packed_conv_avx512_kernel.cpp the convolution's AVX-512 VPOPCNTQ copy
//   packed_packing_kernel.cpp     packing, unpacking, space-to-depth
#pragma once

#include "torch_ext/cpu_isa.h"
#include "torch_ext/packed.h"

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
// Per-ISA copies of the loops are compiled with target attributes and picked
// at run time (cpu_isa.h), so the build flags stay those of the baseline ISA.
#define TORCH_EXT_PACKED_HAVE_AVX2 1
#define TORCH_EXT_AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,popcnt,avx2")))
#endif

namespace torch_ext::cpu::packed {

using word_t = uint64_t;

// The valid bits of the last word of `channels` channels.
inline word_t last_word_mask(int64_t channels) {
  const int64_t r = channels % kPackedWordBits;
  return r == 0 ? ~word_t(0) : ((word_t(1) << r) - 1);
}

// ORs the `count` low bits of src (words) into the words dst[0], dst[stride],
// dst[2 * stride], ... starting at bit `offset`.
C10_ALWAYS_INLINE void or_bits_strided(word_t* dst, int64_t stride, int64_t offset, const word_t* src,
                                       int64_t count) {
  for (int64_t j = 0; j * kPackedWordBits < count; ++j) {
    const int64_t n = std::min<int64_t>(kPackedWordBits, count - j * kPackedWordBits);
    word_t v = src[j];
    if (n < kPackedWordBits) {
      v &= (word_t(1) << n) - 1;
    }
    const int64_t at_bit = offset + j * kPackedWordBits;
    const int64_t word = at_bit / kPackedWordBits;
    const int shift = static_cast<int>(at_bit % kPackedWordBits);
    dst[word * stride] |= v << shift;
    if (shift != 0 && shift + n > kPackedWordBits) {
      dst[(word + 1) * stride] |= v >> (kPackedWordBits - shift);
    }
  }
}

// ORs the `count` low bits of src (words) into dst starting at bit `offset`.
inline void or_bits(word_t* dst, int64_t offset, const word_t* src, int64_t count) {
  or_bits_strided(dst, 1, offset, src, count);
}

// The AVX-512 copies also need VPOPCNTQ (cpu_isa() checks the rest, and the
// cap of TORCH_EXT_CPU_ISA).
inline bool cpu_has_avx512_vpopcnt() {
#ifdef TORCH_EXT_PACKED_HAVE_AVX2
  static const bool has_vpopcnt = __builtin_cpu_supports("avx512vpopcntdq");
  return has_vpopcnt && cpu_isa() >= kIsaAvx512;
#else
  return false;
#endif
}

// The copy of the packed loops to run: AVX-512 with VPOPCNTQ, else AVX2 (an
// AVX-512 CPU without VPOPCNTQ too), else the baseline.
inline IsaCap packed_isa() {
  if (cpu_has_avx512_vpopcnt()) {
    return kIsaAvx512;
  }
#ifdef TORCH_EXT_PACKED_HAVE_AVX2
  return cpu_isa() >= kIsaAvx2 ? kIsaAvx2 : kIsaBaseline;
#else
  return kIsaBaseline;
#endif
}

// ---------------------------------------------------------------------------
// Argument checks (packed_checks.cpp): c10 errors whose messages name the
// operator `op`, the argument and its value.

void check_cpu(const at::Tensor& t, const char* op, const char* name);
// A code width: 1..4 bits.
void check_code_bit(const char* op, const char* name, int64_t bit);
void check_channels(const char* op, const char* name, int64_t channels);
// A packed-codes tensor [N, H, W, bit, words] for `channels` channels.
void check_packed_codes(const char* op, const char* name, const at::Tensor& t, int64_t channels);
// A per-output-channel vector: `dtype`, CPU, shape [O].
void check_per_channel(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t O);

// The sizes of one convolution.
struct Geometry {
  int64_t N, H, W, C, words, bit, O, kh, kw, sh, sw, ph, pw, Ho, Wo;
  // Words of one bit-plane of a gathered receptive field: the kh * kw taps'
  // C channels back to back, so that channel counts that are not a multiple
  // of 64 waste no popcounts (32 channels: two taps a word).
  int64_t K() const { return packed_words(kh * kw * C); }
  bool dense() const { return C % kPackedWordBits == 0; }
  int64_t pixels() const { return N * Ho * Wo; }
};

// The arguments every packed convolution takes; returns its geometry.
Geometry check_conv(const char* op, const at::Tensor& x, const at::Tensor& w, int64_t in_channels,
                    at::IntArrayRef stride, at::IntArrayRef padding);
// Padding bits of packed weights (w contiguous) must be clear.
void check_weight_padding(const char* op, const at::Tensor& w, int64_t in_channels);
// packed_conv2d_threshold's thresholds [O, 2^out_bit - 1] and direction [O]
// (and out_bit itself): dtypes, devices and shapes.
void check_threshold_arguments(const char* op, const at::Tensor& thresholds, const at::Tensor& direction,
                               int64_t O, int64_t out_bit);
// Their values (contiguous): direction +1 or -1, thresholds ascending.
void check_threshold_values(const char* op, const at::Tensor& thresholds, const at::Tensor& direction);

// ---------------------------------------------------------------------------
// The convolution (packed_conv_kernel.cpp, packed_conv_avx512_kernel.cpp).

enum class OutKind { kInt32, kAffine, kThreshold };

// Where and how a convolution writes its output.
struct Output {
  OutKind kind;
  int32_t* acc = nullptr;          // kInt32: [N, O, Ho, Wo]
  float* out = nullptr;            // kAffine: [N, O, Ho, Wo]
  const float* scale = nullptr;    // kAffine: [O]
  const float* bias = nullptr;     // kAffine: [O]
  word_t* packed = nullptr;        // kThreshold: [N, Ho, Wo, out_bit, out_words]
  const int32_t* thresholds = nullptr;  // kThreshold: [O, levels]
  const int32_t* direction = nullptr;   // kThreshold: [O]
  int64_t out_bit = 0;
  int64_t levels = 0;
  int64_t out_words = 0;
};

// Output pixel coordinates, advanced one pixel at a time (no divisions).
struct PixelPos {
  int64_t n, oy, ox;
  PixelPos(const Geometry& g, int64_t pix) : n(pix / (g.Wo * g.Ho)), oy((pix / g.Wo) % g.Ho), ox(pix % g.Wo) {}
  void next(const Geometry& g) {
    if (++ox == g.Wo) {
      ox = 0;
      if (++oy == g.Ho) {
        oy = 0;
        ++n;
      }
    }
  }
};

// Writes the O accumulators of pixel `pix` (an index into N * Ho * Wo) as
// `out` asks. Inlined into every ISA's copy of the convolution loop.
C10_ALWAYS_INLINE void write_pixel(const Geometry& g, const Output& out, int64_t pix, const int32_t* acc) {
  const int64_t plane = g.Ho * g.Wo;
  const int64_t n = pix / plane;
  const int64_t yx = pix % plane;
  switch (out.kind) {
    case OutKind::kInt32: {
      int32_t* dst = out.acc + n * g.O * plane + yx;
      for (int64_t o = 0; o < g.O; ++o) {
        dst[o * plane] = acc[o];
      }
      break;
    }
    case OutKind::kAffine: {
      float* dst = out.out + n * g.O * plane + yx;
      for (int64_t o = 0; o < g.O; ++o) {
        const float prod = static_cast<float>(acc[o]) * out.scale[o];
        dst[o * plane] = prod + out.bias[o];
      }
      break;
    }
    case OutKind::kThreshold: {
      // The code of channel o: how many of its ascending thresholds
      // direction * acc reaches, written as bit-planes.
      word_t* dst = out.packed + pix * out.out_bit * out.out_words;
      std::memset(dst, 0, sizeof(word_t) * out.out_bit * out.out_words);
      for (int64_t o = 0; o < g.O; ++o) {
        const int64_t v = static_cast<int64_t>(out.direction[o]) * acc[o];
        const int32_t* t = out.thresholds + o * out.levels;
        int64_t code = 0;
        for (int64_t k = 0; k < out.levels; ++k) {
          code += v >= t[k];
        }
        const word_t bit = word_t(1) << (o % kPackedWordBits);
        const int64_t word = o / kPackedWordBits;
        for (int64_t p = 0; p < out.out_bit; ++p) {
          if ((code >> p) & 1) {
            dst[p * out.out_words + word] |= bit;
          }
        }
      }
      break;
    }
  }
}

#ifdef TORCH_EXT_PACKED_HAVE_AVX2
// The convolution of BIT-bit codes x with weights w (both in the gathered
// layout's word order) on the AVX-512 VPOPCNTQ copy, parallel over tiles;
// instantiated for BIT = 1..4. Only when cpu_has_avx512_vpopcnt().
template <int BIT>
void run_conv_avx512(const Geometry& g, const word_t* x, const word_t* w, const Output& out);
#endif

}  // namespace torch_ext::cpu::packed
