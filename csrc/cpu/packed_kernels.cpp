// CPU kernels of the bit-packed inference operators (csrc/torch_ext/packed.h,
// docs/deploy.md).
//
// The convolution is a binary GEMM over an on-the-fly im2col of one tile of
// output pixels: for each pixel the kh * kw taps of every bit-plane are
// gathered into K = kh * kw * words contiguous words (taps outside the image
// are zero words: code 0 contributes nothing), and for each output channel
//
//   acc = sum_p 2^p * (2 * popcount(a_p & w) - popcount(a_p))
//
// which is sum(sign(w) * code) exactly: a channel whose code has bit p set
// adds +2^p where its weight bit is set (w >= 0) and -2^p where it is clear.
// popcount(a_p) does not depend on the output channel and is counted once a
// pixel. The loops are compiled twice, for the baseline x86-64 ISA (popcount
// in software) and for AVX2 + POPCNT, picked once a call at run time like the
// quantizer's kernels; the results are the same integers either way.
#include "torch_ext/cpu_isa.h"
#include "torch_ext/formula.h"
#include "torch_ext/packed.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace torch_ext {
namespace cpu {
namespace {

using word_t = uint64_t;

// Output pixels computed together: each weight word is loaded once for all.
constexpr int kTile = 4;

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
  for (int64_t j = 0; j * kPackedWordBits < count; ++j) {
    const int64_t n = std::min<int64_t>(kPackedWordBits, count - j * kPackedWordBits);
    word_t v = src[j];
    if (n < kPackedWordBits) {
      v &= (word_t(1) << n) - 1;
    }
    const int64_t at_bit = offset + j * kPackedWordBits;
    const int64_t word = at_bit / kPackedWordBits;
    const int shift = static_cast<int>(at_bit % kPackedWordBits);
    dst[word] |= v << shift;
    if (shift != 0 && shift + n > kPackedWordBits) {
      dst[word + 1] |= v >> (kPackedWordBits - shift);
    }
  }
}

// ---------------------------------------------------------------------------
// Argument checks (the messages name the argument and the value).

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", name, " on ", t.device());
}

void check_code_bit(const char* op, const char* name, int64_t bit) {
  TORCH_CHECK_VALUE(bit >= 1 && bit <= 4, op, ": ", name, " must be in 1..4, got ", name, "=", bit);
}

void check_channels(const char* op, const char* name, int64_t channels) {
  TORCH_CHECK_VALUE(channels >= 1, op, ": ", name, " must be >= 1, got ", name, "=", channels);
}

// A packed-codes tensor [N, H, W, bit, words] for `channels` channels.
void check_packed_codes(const char* op, const char* name, const at::Tensor& t, int64_t channels) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name,
                   " must be an int64 tensor of packed codes, got ", name, " of dtype ", t.scalar_type());
  check_cpu(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 5, op, ": ", name, " must have shape [N, H, W, bit, words], got ", name,
                    " of shape ", t.sizes());
  check_code_bit(op, "the bit-plane count (dim 3)", t.size(3));
  TORCH_CHECK_VALUE(t.size(4) == packed_words(channels), op, ": ", name, " holds ", t.size(4),
                    " words a bit-plane (dim 4) but ", channels, " channels need ", packed_words(channels),
                    " (got ", name, " of shape ", t.sizes(), ")");
}

struct Geometry {
  int64_t N, H, W, C, words, bit, O, kh, kw, sh, sw, ph, pw, Ho, Wo;
  // Words of one bit-plane of a gathered receptive field: the kh * kw taps'
  // C channels back to back, so that channel counts that are not a multiple
  // of 64 waste no popcounts (32 channels: two taps a word).
  int64_t K() const { return packed_words(kh * kw * C); }
  bool dense() const { return C % kPackedWordBits == 0; }
  int64_t pixels() const { return N * Ho * Wo; }
};

Geometry check_conv(const char* op, const at::Tensor& x, const at::Tensor& w, int64_t in_channels,
                    at::IntArrayRef stride, at::IntArrayRef padding) {
  check_channels(op, "in_channels", in_channels);
  check_packed_codes(op, "x", x, in_channels);
  TORCH_CHECK_TYPE(w.scalar_type() == at::kLong, op, ": w must be an int64 tensor of packed weights, got w of dtype ",
                   w.scalar_type());
  check_cpu(w, op, "w");
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(0) >= 1 && w.size(1) >= 1 && w.size(2) >= 1, op,
                    ": w must have shape [O, kh, kw, words] with O, kh, kw >= 1, got w of shape ", w.sizes());
  TORCH_CHECK_VALUE(w.size(3) == packed_words(in_channels), op, ": w holds ", w.size(3),
                    " words a tap (dim 3) but in_channels=", in_channels, " needs ", packed_words(in_channels));
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
                    ": stride must be two ints >= 1, got stride=", stride);
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
                    ": padding must be two ints >= 0, got padding=", padding);
  Geometry g;
  g.N = x.size(0);
  g.H = x.size(1);
  g.W = x.size(2);
  g.bit = x.size(3);
  g.words = x.size(4);
  g.C = in_channels;
  g.O = w.size(0);
  g.kh = w.size(1);
  g.kw = w.size(2);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  TORCH_CHECK_VALUE(g.H + 2 * g.ph >= g.kh && g.W + 2 * g.pw >= g.kw, op, ": the kernel ", g.kh, "x", g.kw,
                    " is larger than the padded input ", g.H + 2 * g.ph, "x", g.W + 2 * g.pw, " (x of shape ",
                    x.sizes(), ", padding=", padding, ")");
  g.Ho = (g.H + 2 * g.ph - g.kh) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.kw) / g.sw + 1;
  // |acc| <= (2^bit - 1) * C * kh * kw must fit an int32.
  const double bound = double((int64_t(1) << g.bit) - 1) * double(g.C) * double(g.kh) * double(g.kw);
  TORCH_CHECK_VALUE(bound < 2147483647.0, op, ": the accumulator bound (2^bit - 1) * in_channels * kh * kw = ", bound,
                    " does not fit an int32");
  return g;
}

// Padding bits of packed weights must be clear (a tampered tensor is refused
// rather than silently counted).
void check_weight_padding(const char* op, const at::Tensor& w, int64_t in_channels) {
  const word_t mask = last_word_mask(in_channels);
  if (mask == ~word_t(0)) {
    return;
  }
  const int64_t words = w.size(3);
  const auto* p = reinterpret_cast<const word_t*>(w.const_data_ptr<int64_t>());
  const int64_t taps = w.numel() / words;
  for (int64_t t = 0; t < taps; ++t) {
    TORCH_CHECK_VALUE((p[t * words + words - 1] & ~mask) == 0, op, ": w has bits set beyond in_channels=",
                      in_channels, " (in the padding of its last word): not packed by pack_binary_weights for ",
                      in_channels, " input channels");
  }
}

// ---------------------------------------------------------------------------
// The convolution.

enum class OutKind { kInt32, kAffine, kThreshold };

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

// Gathers pixel `pix` (an index into N * Ho * Wo) into buf[p * K + k] for
// each plane p; returns the popcounts of each plane in ones[p].
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

template <int BIT>
C10_ALWAYS_INLINE void gather_pixel(const Geometry& g, const word_t* x, const PixelPos& pos,
                                    word_t* buf, int64_t* ones) {
  const int64_t K = g.K();
  const bool dense = g.dense();
  // Dense layouts (C a multiple of 64) have no padding bits; or_bits masks
  // those of the others, so whatever lies there is ignored.
  if (!dense) {
    std::memset(buf, 0, sizeof(word_t) * BIT * K);
  }
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = pos.oy * g.sh - g.ph + ky;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t ix = pos.ox * g.sw - g.pw + kx;
      const int64_t tap = ky * g.kw + kx;
      const bool inside = iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
      if (!inside) {
        if (dense) {
          for (int p = 0; p < BIT; ++p) {
            std::memset(buf + p * K + tap * g.words, 0, sizeof(word_t) * g.words);
          }
        }
        continue;  // zero padding: code 0
      }
      const word_t* src = x + ((pos.n * g.H + iy) * g.W + ix) * BIT * g.words;
      for (int p = 0; p < BIT; ++p) {
        if (dense) {
          std::memcpy(buf + p * K + tap * g.words, src + p * g.words, sizeof(word_t) * g.words);
        } else {
          or_bits(buf + p * K, tap * g.C, src + p * g.words, g.C);
        }
      }
    }
  }
  for (int p = 0; p < BIT; ++p) {
    int64_t count = 0;
    for (int64_t k = 0; k < K; ++k) {
      count += __builtin_popcountll(buf[p * K + k]);
    }
    ones[p] = count;
  }
}

// acc[t * O + o] for the kTile gathered pixels of buf ([kTile][BIT][K]).
template <int BIT>
C10_ALWAYS_INLINE void dot_tile(const word_t* buf, const word_t* w, int64_t K, int64_t O, const int64_t* ones,
                                int32_t* acc) {
  for (int64_t o = 0; o < O; ++o) {
    const word_t* wo = w + o * K;
    int64_t s[kTile][BIT];
    for (int t = 0; t < kTile; ++t) {
      for (int p = 0; p < BIT; ++p) {
        s[t][p] = 0;
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      const word_t wk = wo[k];
      for (int t = 0; t < kTile; ++t) {
        for (int p = 0; p < BIT; ++p) {
          s[t][p] += __builtin_popcountll(buf[(t * BIT + p) * K + k] & wk);
        }
      }
    }
    for (int t = 0; t < kTile; ++t) {
      int64_t a = 0;
      for (int p = 0; p < BIT; ++p) {
        a += (2 * s[t][p] - ones[t * BIT + p]) << p;
      }
      acc[t * O + o] = static_cast<int32_t>(a);
    }
  }
}

void write_pixel(const Geometry& g, const Output& out, int64_t pix, const int32_t* acc) {
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

template <int BIT>
C10_ALWAYS_INLINE void conv_tiles(const Geometry& g, const word_t* x, const word_t* w, const Output& out,
                                  int64_t tile_begin, int64_t tile_end) {
  const int64_t K = g.K();
  std::vector<word_t> buf(static_cast<size_t>(kTile * BIT * K));
  std::vector<int32_t> acc(static_cast<size_t>(kTile * g.O));
  int64_t ones[kTile * BIT];
  const int64_t pixels = g.pixels();
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t first = tile * kTile;
    const int64_t count = std::min<int64_t>(kTile, pixels - first);
    PixelPos pos(g, first);
    for (int t = 0; t < kTile; ++t) {
      if (t < count) {
        gather_pixel<BIT>(g, x, pos, buf.data() + t * BIT * K, ones + t * BIT);
        pos.next(g);
      } else {
        std::memset(buf.data() + t * BIT * K, 0, sizeof(word_t) * BIT * K);
        for (int p = 0; p < BIT; ++p) {
          ones[t * BIT + p] = 0;
        }
      }
    }
    dot_tile<BIT>(buf.data(), w, K, g.O, ones, acc.data());
    for (int64_t t = 0; t < count; ++t) {
      write_pixel(g, out, first + t, acc.data() + t * g.O);
    }
  }
}

template <int BIT>
void conv_tiles_baseline(const Geometry& g, const word_t* x, const word_t* w, const Output& out, int64_t b,
                         int64_t e) {
  conv_tiles<BIT>(g, x, w, out, b, e);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define TORCH_EXT_PACKED_HAVE_AVX2 1
template <int BIT>
__attribute__((target("avx2,popcnt"))) void conv_tiles_avx2(const Geometry& g, const word_t* x, const word_t* w,
                                                             const Output& out, int64_t b, int64_t e) {
  conv_tiles<BIT>(g, x, w, out, b, e);
}

#endif

#ifdef TORCH_EXT_PACKED_HAVE_AVX2
// AVX-512 with VPOPCNTQ: 16 output pixels a tile, one 64-bit lane each (two
// vectors), so that every weight word is broadcast once and meets 16 pixels'
// words in one AND + VPOPCNTQ + ADD per vector and plane. The threshold
// output is computed in the same registers: each channel's 16 codes come
// from vector compares, and their bits are OR-ed into the 16 pixels' output
// words, which are stored when a word of 64 channels is complete.
#define TORCH_EXT_AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,popcnt,avx2")))
constexpr int kLanes = 16;

// The AVX-512 copy here also needs VPOPCNTQ (cpu_isa() checks the rest, and
// the cap).
bool cpu_has_avx512_vpopcnt() {
  static const bool has_vpopcnt = __builtin_cpu_supports("avx512vpopcntdq");
  return has_vpopcnt && cpu_isa() >= kIsaAvx512;
}

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own temporaries.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int BIT>
TORCH_EXT_AVX512_TARGET void conv_tiles_avx512(const Geometry& g, const word_t* x, const word_t* w,
                                               const Output& out, int64_t tile_begin, int64_t tile_end) {
  const int64_t K = g.K();
  const bool threshold = out.kind == OutKind::kThreshold;
  const bool dense = g.dense();
  std::vector<word_t> buf(static_cast<size_t>(BIT * K * kLanes));  // [p][k][lane]
  std::vector<int32_t> accbuf(threshold ? 0 : static_cast<size_t>(kLanes * g.O));
  alignas(64) int64_t lanes[kLanes];
  const int64_t pixels = g.pixels();
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t first = tile * kLanes;
    const int64_t count = std::min<int64_t>(kLanes, pixels - first);
    // Gathered straight into the lanes: buf[(p * K + k) * kLanes + t]; lanes
    // of taps outside the image and of pixels past the end stay 0.
    std::memset(buf.data(), 0, sizeof(word_t) * buf.size());
    PixelPos pos(g, first);
    for (int64_t t = 0; t < count; ++t) {
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = pos.oy * g.sh - g.ph + ky;
        if (iy < 0 || iy >= g.H) {
          continue;
        }
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = pos.ox * g.sw - g.pw + kx;
          if (ix < 0 || ix >= g.W) {
            continue;
          }
          const int64_t tap = ky * g.kw + kx;
          const word_t* src = x + ((pos.n * g.H + iy) * g.W + ix) * BIT * g.words;
          for (int p = 0; p < BIT; ++p) {
            word_t* dst = buf.data() + p * K * kLanes + t;
            if (dense) {
              for (int64_t j = 0; j < g.words; ++j) {
                dst[(tap * g.words + j) * kLanes] = src[p * g.words + j];
              }
            } else {
              or_bits_strided(dst, kLanes, tap * g.C, src + p * g.words, g.C);
            }
          }
        }
      }
      pos.next(g);
    }
    // popcount(a_p) of each pixel, the 16 lanes at once.
    __m512i ones_v[2][BIT];
    for (int p = 0; p < BIT; ++p) {
      ones_v[0][p] = _mm512_setzero_si512();
      ones_v[1][p] = _mm512_setzero_si512();
      for (int64_t k = 0; k < K; ++k) {
        const word_t* row = buf.data() + (p * K + k) * kLanes;
        ones_v[0][p] = _mm512_add_epi64(ones_v[0][p], _mm512_popcnt_epi64(_mm512_loadu_si512(row)));
        ones_v[1][p] = _mm512_add_epi64(ones_v[1][p], _mm512_popcnt_epi64(_mm512_loadu_si512(row + 8)));
      }
    }
    __m512i ow[2][4];
    for (int p = 0; p < 4; ++p) {
      ow[0][p] = _mm512_setzero_si512();
      ow[1][p] = _mm512_setzero_si512();
    }
    const word_t* bp = buf.data();
    for (int64_t o = 0; o < g.O; ++o) {
      const word_t* wo = w + o * K;
      __m512i s0[BIT], s1[BIT];
      for (int p = 0; p < BIT; ++p) {
        s0[p] = _mm512_setzero_si512();
        s1[p] = _mm512_setzero_si512();
      }
      for (int64_t k = 0; k < K; ++k) {
        const __m512i wv = _mm512_set1_epi64(static_cast<long long>(wo[k]));
        for (int p = 0; p < BIT; ++p) {
          const word_t* a = bp + (p * K + k) * kLanes;
          s0[p] = _mm512_add_epi64(s0[p], _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(a), wv)));
          s1[p] = _mm512_add_epi64(s1[p], _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(a + 8), wv)));
        }
      }
      __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
      for (int p = 0; p < BIT; ++p) {
        acc0 = _mm512_add_epi64(acc0, _mm512_slli_epi64(_mm512_sub_epi64(_mm512_slli_epi64(s0[p], 1), ones_v[0][p]), p));
        acc1 = _mm512_add_epi64(acc1, _mm512_slli_epi64(_mm512_sub_epi64(_mm512_slli_epi64(s1[p], 1), ones_v[1][p]), p));
      }
      // |acc| < 2^31 (checked): the narrowing is exact.
      __m512i acc32 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(acc0)),
                                         _mm512_cvtepi64_epi32(acc1), 1);
      if (!threshold) {
        _mm512_store_si512(lanes, acc0);
        for (int t = 0; t < 8; ++t) {
          accbuf[t * g.O + o] = static_cast<int32_t>(lanes[t]);
        }
        _mm512_store_si512(lanes, acc1);
        for (int t = 0; t < 8; ++t) {
          accbuf[(t + 8) * g.O + o] = static_cast<int32_t>(lanes[t]);
        }
        continue;
      }
      if (out.direction[o] < 0) {
        acc32 = _mm512_sub_epi32(_mm512_setzero_si512(), acc32);
      }
      const int32_t* th = out.thresholds + o * out.levels;
      // ge[k]: the lanes whose code is >= k + 1. The thresholds ascend (checked),
      // so these sets are nested and bit p of the code is the parity of how
      // many of the levels 2^p, 2 * 2^p, 3 * 2^p, ... the code reaches.
      uint32_t ge[15];
      for (int64_t k = 0; k < out.levels; ++k) {
        ge[k] = _mm512_cmpge_epi32_mask(acc32, _mm512_set1_epi32(th[k]));
      }
      const __m512i bit = _mm512_set1_epi64(static_cast<long long>(word_t(1) << (o % kPackedWordBits)));
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        if (p < out.out_bit) {
          uint32_t parity = 0;
          for (int64_t level = int64_t(1) << p; level <= out.levels; level += int64_t(1) << p) {
            parity ^= ge[level - 1];
          }
          const __mmask16 set = static_cast<__mmask16>(parity);
          ow[0][p] = _mm512_mask_or_epi64(ow[0][p], static_cast<__mmask8>(set), ow[0][p], bit);
          ow[1][p] = _mm512_mask_or_epi64(ow[1][p], static_cast<__mmask8>(set >> 8), ow[1][p], bit);
        }
      }
      if (o % kPackedWordBits == kPackedWordBits - 1 || o == g.O - 1) {
        const int64_t word = o / kPackedWordBits;
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) {
          if (p >= out.out_bit) {
            continue;
          }
          alignas(64) word_t words[kLanes];
          _mm512_store_si512(words, ow[0][p]);
          _mm512_store_si512(words + 8, ow[1][p]);
          for (int64_t t = 0; t < count; ++t) {
            out.packed[(first + t) * out.out_bit * out.out_words + p * out.out_words + word] = words[t];
          }
          ow[0][p] = _mm512_setzero_si512();
          ow[1][p] = _mm512_setzero_si512();
        }
      }
    }
    if (!threshold) {
      for (int64_t t = 0; t < count; ++t) {
        write_pixel(g, out, first + t, accbuf.data() + t * g.O);
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

template <int BIT>
void run_conv_bit(const Geometry& g, const word_t* x, const word_t* w, const Output& out) {
#ifdef TORCH_EXT_PACKED_HAVE_AVX2
  if (cpu_has_avx512_vpopcnt()) {
    const int64_t tiles = (g.pixels() + kLanes - 1) / kLanes;
    // At least ~1M word operations (tens of microseconds) a task: small layers
    // at batch 1 stay on one thread, where waking another costs more than it
    // brings on a busy machine.
    const int64_t work = std::max<int64_t>(1, kLanes * BIT * g.K() * g.O);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / work);
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      conv_tiles_avx512<BIT>(g, x, w, out, begin, end);
    });
    return;
  }
#endif
  const int64_t tiles = (g.pixels() + kTile - 1) / kTile;
  // About 64k word operations a task at least.
  const int64_t work = std::max<int64_t>(1, kTile * BIT * g.K() * g.O);
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
#ifdef TORCH_EXT_PACKED_HAVE_AVX2
  const bool avx2 = cpu_isa() >= kIsaAvx2;
#else
  const bool avx2 = false;
#endif
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
#ifdef TORCH_EXT_PACKED_HAVE_AVX2
    if (avx2) {
      conv_tiles_avx2<BIT>(g, x, w, out, begin, end);
      return;
    }
#endif
    (void)avx2;
    conv_tiles_baseline<BIT>(g, x, w, out, begin, end);
  });
}

void run_conv(const Geometry& g, const at::Tensor& x, const at::Tensor& w, const Output& out) {
  if (g.pixels() == 0 || g.O == 0) {
    return;
  }
  const auto* xp = reinterpret_cast<const word_t*>(x.const_data_ptr<int64_t>());
  const auto* wp = reinterpret_cast<const word_t*>(w.const_data_ptr<int64_t>());
  // The weights in the gathered layout (taps back to back), once a call.
  std::vector<word_t> compact;
  if (!g.dense()) {
    const int64_t K = g.K();
    const int64_t taps = g.kh * g.kw;
    compact.assign(static_cast<size_t>(g.O * K), 0);
    for (int64_t o = 0; o < g.O; ++o) {
      for (int64_t tap = 0; tap < taps; ++tap) {
        or_bits(compact.data() + o * K, tap * g.C, wp + (o * taps + tap) * g.words, g.C);
      }
    }
    wp = compact.data();
  }
  switch (g.bit) {
    case 1: run_conv_bit<1>(g, xp, wp, out); break;
    case 2: run_conv_bit<2>(g, xp, wp, out); break;
    case 3: run_conv_bit<3>(g, xp, wp, out); break;
    default: run_conv_bit<4>(g, xp, wp, out); break;
  }
}

at::Tensor packed_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& w_in, int64_t in_channels,
                             at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "packed_conv2d";
  const Geometry g = check_conv(op, x_in, w_in, in_channels, stride, padding);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  check_weight_padding(op, w, in_channels);
  at::Tensor acc = at::empty({g.N, g.O, g.Ho, g.Wo}, x.options().dtype(at::kInt));
  Output out{OutKind::kInt32};
  out.acc = acc.data_ptr<int32_t>();
  run_conv(g, x, w, out);
  return acc;
}

void check_per_channel(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t O) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be a ", dtype, " tensor, got ", name,
                   " of dtype ", t.scalar_type());
  check_cpu(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == O, op, ": ", name, " must have shape [", O,
                    "] (one value an output channel of w), got ", name, " of shape ", t.sizes());
}

at::Tensor packed_conv2d_affine_cpu(const at::Tensor& x_in, const at::Tensor& w_in, int64_t in_channels,
                                    at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& scale_in,
                                    const at::Tensor& bias_in) {
  const char* op = "packed_conv2d_affine";
  const Geometry g = check_conv(op, x_in, w_in, in_channels, stride, padding);
  check_per_channel(op, "scale", scale_in, at::kFloat, g.O);
  check_per_channel(op, "bias", bias_in, at::kFloat, g.O);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  check_weight_padding(op, w, in_channels);
  at::Tensor y = at::empty({g.N, g.O, g.Ho, g.Wo}, x.options().dtype(at::kFloat));
  Output out{OutKind::kAffine};
  out.out = y.data_ptr<float>();
  out.scale = scale.const_data_ptr<float>();
  out.bias = bias.const_data_ptr<float>();
  run_conv(g, x, w, out);
  return y;
}

at::Tensor packed_conv2d_threshold_cpu(const at::Tensor& x_in, const at::Tensor& w_in, int64_t in_channels,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       const at::Tensor& thresholds_in, const at::Tensor& direction_in,
                                       int64_t out_bit) {
  const char* op = "packed_conv2d_threshold";
  const Geometry g = check_conv(op, x_in, w_in, in_channels, stride, padding);
  check_code_bit(op, "out_bit", out_bit);
  const int64_t levels = (int64_t(1) << out_bit) - 1;
  TORCH_CHECK_TYPE(thresholds_in.scalar_type() == at::kInt, op,
                   ": thresholds must be an int32 tensor, got thresholds of dtype ", thresholds_in.scalar_type());
  check_cpu(thresholds_in, op, "thresholds");
  TORCH_CHECK_VALUE(thresholds_in.dim() == 2 && thresholds_in.size(0) == g.O && thresholds_in.size(1) == levels, op,
                    ": thresholds must have shape [", g.O, ", ", levels, "] (output channels of w, 2^out_bit - 1 for out_bit=",
                    out_bit, "), got thresholds of shape ", thresholds_in.sizes());
  check_per_channel(op, "direction", direction_in, at::kInt, g.O);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  const at::Tensor thresholds = thresholds_in.contiguous();
  const at::Tensor direction = direction_in.contiguous();
  check_weight_padding(op, w, in_channels);
  const int32_t* t = thresholds.const_data_ptr<int32_t>();
  const int32_t* d = direction.const_data_ptr<int32_t>();
  for (int64_t o = 0; o < g.O; ++o) {
    TORCH_CHECK_VALUE(d[o] == 1 || d[o] == -1, op, ": direction must hold +1 or -1, got direction[", o, "]=", d[o]);
    for (int64_t k = 1; k < levels; ++k) {
      TORCH_CHECK_VALUE(t[o * levels + k - 1] <= t[o * levels + k], op,
                        ": thresholds must ascend along dim 1, got thresholds[", o, "]=", thresholds[o]);
    }
  }
  const int64_t out_words = packed_words(g.O);
  at::Tensor y = at::empty({g.N, g.Ho, g.Wo, out_bit, out_words}, x.options().dtype(at::kLong));
  Output out{OutKind::kThreshold};
  out.packed = reinterpret_cast<word_t*>(y.data_ptr<int64_t>());
  out.thresholds = t;
  out.direction = d;
  out.out_bit = out_bit;
  out.levels = levels;
  out.out_words = out_words;
  run_conv(g, x, w, out);
  return y;
}

// ---------------------------------------------------------------------------
// Packing, unpacking, space-to-depth.

at::Tensor pack_codes_cpu(const at::Tensor& codes, int64_t bit) {
  const char* op = "pack_codes";
  check_code_bit(op, "bit", bit);
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, op, ": codes must be a uint8 tensor (quantize_to_codes), got codes of dtype ",
                   codes.scalar_type());
  check_cpu(codes, op, "codes");
  TORCH_CHECK_VALUE(codes.dim() == 4 && codes.size(1) >= 1, op,
                    ": codes must have shape [N, C, H, W] with C >= 1, got codes of shape ", codes.sizes());
  const int64_t N = codes.size(0), C = codes.size(1), H = codes.size(2), W = codes.size(3);
  const int64_t words = packed_words(C);
  // NHWC: the channels of a pixel side by side.
  const at::Tensor nhwc = codes.permute({0, 2, 3, 1}).contiguous();
  if (nhwc.numel() > 0) {
    const int64_t top = nhwc.max().item<int64_t>();
    TORCH_CHECK_VALUE(top < (int64_t(1) << bit), op, ": codes must be in 0..", (int64_t(1) << bit) - 1,
                      " for bit=", bit, ", got a code ", top);
  }
  at::Tensor out = at::zeros({N, H, W, bit, words}, codes.options().dtype(at::kLong));
  const uint8_t* src = nhwc.const_data_ptr<uint8_t>();
  auto* dst = reinterpret_cast<word_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, N * H * W, std::max<int64_t>(1, 4096 / C), [&](int64_t b, int64_t e) {
    for (int64_t pix = b; pix < e; ++pix) {
      const uint8_t* s = src + pix * C;
      word_t* d = dst + pix * bit * words;
      for (int64_t c = 0; c < C; ++c) {
        const word_t one = word_t(1) << (c % kPackedWordBits);
        for (int64_t p = 0; p < bit; ++p) {
          if ((s[c] >> p) & 1) {
            d[p * words + c / kPackedWordBits] |= one;
          }
        }
      }
    }
  });
  return out;
}

// float32 [N, C, H, W] -> packed codes, the code of each element computed as
// torch_ext.quantize_to_codes does (docs/quantizer.md, float32 steps: clip,
// divide by m, multiply by n, add 0.5, floor; NaN gives code 0).
//
// A task is a chunk of kQChunk pixels of one image: the codes are computed
// channel by channel over contiguous pixels (vectorized), transposed to
// pixel-major bytes, and each word of 64 channels is built from 64 bytes
// (with AVX-512BW one masked load and one test a plane).
constexpr int64_t kQChunk = 256;

struct QuantizePackArgs {
  const float* src;  // the image's [C, H*W]
  int64_t C, HW, start, count, bit, words;
  float m, n;
  word_t* dst;  // the chunk's first pixel in the output
};

// The codes of a chunk, pixel-major: jc[j * C + c].
C10_ALWAYS_INLINE void quantize_chunk(const QuantizePackArgs& a, uint8_t* cj, uint8_t* jc) {
  for (int64_t c = 0; c < a.C; ++c) {
    const float* s = a.src + c * a.HW + a.start;
    uint8_t* o = cj + c * kQChunk;
    for (int64_t j = 0; j < a.count; ++j) {
      // The quantizer's own level (formula.h), each step rounded in float.
      const float level = formula::level(formula::clip(s[j], a.m), a.m, a.n);
      const float safe = level == level ? level : 0.0f;  // NaN -> 0
      o[j] = static_cast<uint8_t>(static_cast<int32_t>(safe));
    }
  }
  for (int64_t j = 0; j < a.count; ++j) {
    for (int64_t c = 0; c < a.C; ++c) {
      jc[j * a.C + c] = cj[c * kQChunk + j];
    }
  }
}

C10_ALWAYS_INLINE void pack_chunk_scalar(const QuantizePackArgs& a, const uint8_t* jc) {
  for (int64_t j = 0; j < a.count; ++j) {
    const uint8_t* row = jc + j * a.C;
    word_t* d = a.dst + j * a.bit * a.words;
    for (int64_t wd = 0; wd < a.words; ++wd) {
      const int64_t c0 = wd * kPackedWordBits;
      const int64_t cnt = std::min<int64_t>(kPackedWordBits, a.C - c0);
      for (int64_t p = 0; p < a.bit; ++p) {
        word_t word = 0;
        for (int64_t c = 0; c < cnt; ++c) {
          word |= static_cast<word_t>((row[c0 + c] >> p) & 1) << c;
        }
        d[p * a.words + wd] = word;
      }
    }
  }
}

void quantize_pack_baseline(const QuantizePackArgs& a, uint8_t* cj, uint8_t* jc) {
  quantize_chunk(a, cj, jc);
  pack_chunk_scalar(a, jc);
}

#ifdef TORCH_EXT_PACKED_HAVE_AVX2
// AVX2 has a vector floor (vroundps); the baseline ISA does not.
__attribute__((target("avx2,popcnt"))) void quantize_pack_avx2(const QuantizePackArgs& a, uint8_t* cj,
                                                                uint8_t* jc) {
  quantize_chunk(a, cj, jc);
  pack_chunk_scalar(a, jc);
}
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// A word of 64 channels and one plane is one masked byte load and one test.
TORCH_EXT_AVX512_TARGET void quantize_pack_avx512(const QuantizePackArgs& a, uint8_t* cj, uint8_t* jc) {
  quantize_chunk(a, cj, jc);
  for (int64_t j = 0; j < a.count; ++j) {
    const uint8_t* row = jc + j * a.C;
    word_t* d = a.dst + j * a.bit * a.words;
    for (int64_t wd = 0; wd < a.words; ++wd) {
      const int64_t c0 = wd * kPackedWordBits;
      const int64_t cnt = std::min<int64_t>(kPackedWordBits, a.C - c0);
      const __mmask64 load = cnt == 64 ? ~__mmask64(0) : ((__mmask64(1) << cnt) - 1);
      const __m512i v = _mm512_maskz_loadu_epi8(load, row + c0);
      for (int64_t p = 0; p < a.bit; ++p) {
        d[p * a.words + wd] = _mm512_test_epi8_mask(v, _mm512_set1_epi8(static_cast<char>(1 << p)));
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

at::Tensor quantize_pack_codes_cpu(const at::Tensor& x_in, int64_t bit, double max_value) {
  const char* op = "quantize_pack_codes";
  check_code_bit(op, "bit", bit);
  TORCH_CHECK_VALUE(std::isfinite(max_value) && max_value > 0.0, op,
                    ": max_value must be finite and > 0, got max_value=", max_value);
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, op, ": x must be a float32 tensor, got x of dtype ",
                   x_in.scalar_type());
  check_cpu(x_in, op, "x");
  TORCH_CHECK_VALUE(x_in.dim() == 4 && x_in.size(1) >= 1, op,
                    ": x must have shape [N, C, H, W] with C >= 1, got x of shape ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t HW = H * W;
  const int64_t words = packed_words(C);
  at::Tensor out = at::empty({N, H, W, bit, words}, x.options().dtype(at::kLong));
  if (out.numel() == 0) {
    return out;
  }
  const float m = static_cast<float>(max_value);
  const float n = static_cast<float>((int64_t(1) << bit) - 1);
  const float* src = x.const_data_ptr<float>();
  auto* dst = reinterpret_cast<word_t*>(out.data_ptr<int64_t>());
  const int64_t chunks_per_image = (HW + kQChunk - 1) / kQChunk;
#ifdef TORCH_EXT_PACKED_HAVE_AVX2
  const int isa = cpu_has_avx512_vpopcnt() ? 2 : (cpu_isa() >= kIsaAvx2 ? 1 : 0);
#else
  const int isa = 0;
#endif
  at::parallel_for(0, N * chunks_per_image, std::max<int64_t>(1, 16384 / (C * kQChunk)), [&](int64_t b, int64_t e) {
    std::vector<uint8_t> cj(static_cast<size_t>(C * kQChunk));
    std::vector<uint8_t> jc(static_cast<size_t>(C * kQChunk));
    for (int64_t task = b; task < e; ++task) {
      const int64_t nimg = task / chunks_per_image;
      QuantizePackArgs a;
      a.start = (task % chunks_per_image) * kQChunk;
      a.count = std::min<int64_t>(kQChunk, HW - a.start);
      a.src = src + nimg * C * HW;
      a.C = C;
      a.HW = HW;
      a.bit = bit;
      a.words = words;
      a.m = m;
      a.n = n;
      a.dst = dst + (nimg * HW + a.start) * bit * words;
#ifdef TORCH_EXT_PACKED_HAVE_AVX2
      if (isa == 2) {
        quantize_pack_avx512(a, cj.data(), jc.data());
        continue;
      }
      if (isa == 1) {
        quantize_pack_avx2(a, cj.data(), jc.data());
        continue;
      }
#endif
      (void)isa;
      quantize_pack_baseline(a, cj.data(), jc.data());
    }
  });
  return out;
}

at::Tensor unpack_codes_cpu(const at::Tensor& packed_in, int64_t channels) {
  const char* op = "unpack_codes";
  check_channels(op, "channels", channels);
  check_packed_codes(op, "packed", packed_in, channels);
  const at::Tensor packed = packed_in.contiguous();
  const int64_t N = packed.size(0), H = packed.size(1), W = packed.size(2), bit = packed.size(3);
  const int64_t words = packed.size(4);
  at::Tensor nhwc = at::empty({N, H, W, channels}, packed.options().dtype(at::kByte));
  const auto* src = reinterpret_cast<const word_t*>(packed.const_data_ptr<int64_t>());
  uint8_t* dst = nhwc.data_ptr<uint8_t>();
  at::parallel_for(0, N * H * W, std::max<int64_t>(1, 4096 / channels), [&](int64_t b, int64_t e) {
    for (int64_t pix = b; pix < e; ++pix) {
      const word_t* s = src + pix * bit * words;
      uint8_t* d = dst + pix * channels;
      for (int64_t c = 0; c < channels; ++c) {
        uint8_t code = 0;
        for (int64_t p = 0; p < bit; ++p) {
          code |= static_cast<uint8_t>(((s[p * words + c / kPackedWordBits] >> (c % kPackedWordBits)) & 1) << p);
        }
        d[c] = code;
      }
    }
  });
  return nhwc.permute({0, 3, 1, 2}).contiguous();
}

at::Tensor packed_space_to_depth_cpu(const at::Tensor& packed_in, int64_t channels, int64_t block) {
  const char* op = "packed_space_to_depth";
  check_channels(op, "channels", channels);
  check_packed_codes(op, "packed", packed_in, channels);
  TORCH_CHECK_VALUE(block >= 1, op, ": block must be >= 1, got block=", block);
  const int64_t N = packed_in.size(0), H = packed_in.size(1), W = packed_in.size(2), bit = packed_in.size(3);
  TORCH_CHECK_VALUE(H % block == 0 && W % block == 0, op, ": height and width must be divisible by block=", block,
                    ", got packed of shape ", packed_in.sizes());
  const at::Tensor packed = packed_in.contiguous();
  const int64_t words = packed.size(4);
  const int64_t Ho = H / block, Wo = W / block;
  const int64_t out_channels = channels * block * block;
  const int64_t out_words = packed_words(out_channels);
  at::Tensor out = at::zeros({N, Ho, Wo, bit, out_words}, packed.options());
  const auto* src = reinterpret_cast<const word_t*>(packed.const_data_ptr<int64_t>());
  auto* dst = reinterpret_cast<word_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, N * Ho * Wo, 16, [&](int64_t b, int64_t e) {
    for (int64_t pix = b; pix < e; ++pix) {
      const int64_t x = pix % Wo;
      const int64_t y = (pix / Wo) % Ho;
      const int64_t n = pix / (Wo * Ho);
      word_t* d = dst + pix * bit * out_words;
      for (int64_t dy = 0; dy < block; ++dy) {
        for (int64_t dx = 0; dx < block; ++dx) {
          const word_t* s = src + ((n * H + y * block + dy) * W + x * block + dx) * bit * words;
          const int64_t offset = (dy * block + dx) * channels;
          for (int64_t p = 0; p < bit; ++p) {
            or_bits(d + p * out_words, offset, s + p * words, channels);
          }
        }
      }
    }
  });
  return out;
}

at::Tensor pack_binary_weights_cpu(const at::Tensor& weight) {
  const char* op = "pack_binary_weights";
  TORCH_CHECK_TYPE(weight.is_floating_point(), op, ": weight must be a floating-point tensor, got weight of dtype ",
                   weight.scalar_type());
  check_cpu(weight, op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) >= 1 && weight.size(1) >= 1 && weight.size(2) >= 1 &&
                        weight.size(3) >= 1,
                    op, ": weight must have shape [O, I, kh, kw] with every size >= 1, got weight of shape ",
                    weight.sizes());
  const int64_t O = weight.size(0), I = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  const int64_t words = packed_words(I);
  // [O, kh, kw, I] of 0/1: where(w >= 0, 1, -1) as a bit (NaN is not >= 0).
  const at::Tensor bits = weight.ge(0).permute({0, 2, 3, 1}).contiguous();
  at::Tensor out = at::zeros({O, kh, kw, words}, weight.options().dtype(at::kLong));
  const bool* s = bits.const_data_ptr<bool>();
  auto* d = reinterpret_cast<word_t*>(out.data_ptr<int64_t>());
  for (int64_t tap = 0; tap < O * kh * kw; ++tap) {
    for (int64_t c = 0; c < I; ++c) {
      if (s[tap * I + c]) {
        d[tap * words + c / kPackedWordBits] |= word_t(1) << (c % kPackedWordBits);
      }
    }
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace torch_ext

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("pack_codes", &torch_ext::cpu::pack_codes_cpu);
  m.impl("quantize_pack_codes", &torch_ext::cpu::quantize_pack_codes_cpu);
  m.impl("unpack_codes", &torch_ext::cpu::unpack_codes_cpu);
  m.impl("pack_binary_weights", &torch_ext::cpu::pack_binary_weights_cpu);
  m.impl("packed_space_to_depth", &torch_ext::cpu::packed_space_to_depth_cpu);
  m.impl("packed_conv2d", &torch_ext::cpu::packed_conv2d_cpu);
  m.impl("packed_conv2d_affine", &torch_ext::cpu::packed_conv2d_affine_cpu);
  m.impl("packed_conv2d_threshold", &torch_ext::cpu::packed_conv2d_threshold_cpu);
}
