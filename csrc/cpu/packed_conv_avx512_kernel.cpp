// The packed convolution's AVX-512 copy (the others, and the operators:
// packed_conv_kernel.cpp), for CPUs with VPOPCNTQ.
//
// 16 output pixels a tile, one 64-bit lane each (two vectors), so that every
// weight word is broadcast once and meets 16 pixels' words in one AND +
// VPOPCNTQ + ADD per vector and plane. The threshold output is computed in
// the same registers: each channel's 16 codes come from vector compares, and
// their bits are OR-ed into the 16 pixels' output words, which are stored
// when a word of 64 channels is complete.
//
// The helpers are always inlined into conv_tiles_avx512 (and share its
// target), so the loops compile as one function: the split is for reading.
#include "cpu/packed_kernel.h"

#ifdef TORCH_EXT_PACKED_HAVE_AVX2

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace torch_ext::cpu::packed {
namespace {

constexpr int kLanes = 16;

// Two vectors of 8 lanes: lanes 0..7 and 8..15 of a tile.
using LanePair = __m512i[2];

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own temporaries.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Gathers the `count` pixels from `first` on straight into the lanes:
// buf[(p * K + k) * kLanes + t]; lanes of taps outside the image and of
// pixels past the end stay 0.
template <int BIT>
TORCH_EXT_AVX512_TARGET C10_ALWAYS_INLINE void gather_lanes(const Geometry& g, const word_t* x, int64_t first,
                                                            int64_t count, std::vector<word_t>& buf) {
  const int64_t K = g.K();
  const bool dense = g.dense();
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
}

// popcount(a_p) of each pixel, the 16 lanes at once.
template <int BIT>
TORCH_EXT_AVX512_TARGET C10_ALWAYS_INLINE void count_ones(const word_t* buf, int64_t K, LanePair (&ones_v)[BIT]) {
  for (int p = 0; p < BIT; ++p) {
    ones_v[p][0] = _mm512_setzero_si512();
    ones_v[p][1] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; ++k) {
      const word_t* row = buf + (p * K + k) * kLanes;
      ones_v[p][0] = _mm512_add_epi64(ones_v[p][0], _mm512_popcnt_epi64(_mm512_loadu_si512(row)));
      ones_v[p][1] = _mm512_add_epi64(ones_v[p][1], _mm512_popcnt_epi64(_mm512_loadu_si512(row + 8)));
    }
  }
}

// The hot loop: acc of one output channel (weights wo) for the 16 lanes.
template <int BIT>
TORCH_EXT_AVX512_TARGET C10_ALWAYS_INLINE void dot_lanes(const word_t* bp, const word_t* wo, int64_t K,
                                                         const LanePair (&ones_v)[BIT], LanePair& acc) {
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
  acc[0] = _mm512_setzero_si512();
  acc[1] = _mm512_setzero_si512();
  for (int p = 0; p < BIT; ++p) {
    acc[0] = _mm512_add_epi64(acc[0], _mm512_slli_epi64(_mm512_sub_epi64(_mm512_slli_epi64(s0[p], 1), ones_v[p][0]), p));
    acc[1] = _mm512_add_epi64(acc[1], _mm512_slli_epi64(_mm512_sub_epi64(_mm512_slli_epi64(s1[p], 1), ones_v[p][1]), p));
  }
}

// Channel o's 16 accumulators into accbuf[t * O + o] (the int32 and affine
// outputs are written from there, pixel by pixel, by write_pixel).
TORCH_EXT_AVX512_TARGET C10_ALWAYS_INLINE void spill_lanes(const LanePair& acc, int32_t* accbuf, int64_t O,
                                                           int64_t o) {
  alignas(64) int64_t lanes[kLanes];
  _mm512_store_si512(lanes, acc[0]);
  for (int t = 0; t < 8; ++t) {
    accbuf[t * O + o] = static_cast<int32_t>(lanes[t]);
  }
  _mm512_store_si512(lanes, acc[1]);
  for (int t = 0; t < 8; ++t) {
    accbuf[(t + 8) * O + o] = static_cast<int32_t>(lanes[t]);
  }
}

// ORs channel o's code bits (from its 16 accumulators acc32) into the
// output words ow[p] of the 16 pixels.
TORCH_EXT_AVX512_TARGET C10_ALWAYS_INLINE void threshold_lanes(const Output& out, int64_t o, __m512i acc32,
                                                               LanePair (&ow)[4]) {
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
      ow[p][0] = _mm512_mask_or_epi64(ow[p][0], static_cast<__mmask8>(set), ow[p][0], bit);
      ow[p][1] = _mm512_mask_or_epi64(ow[p][1], static_cast<__mmask8>(set >> 8), ow[p][1], bit);
    }
  }
}

// Stores word `word` of each plane of the `count` pixels from `first`, and
// clears ow for the next 64 channels.
TORCH_EXT_AVX512_TARGET C10_ALWAYS_INLINE void store_words(const Output& out, int64_t first, int64_t count,
                                                           int64_t word, LanePair (&ow)[4]) {
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    if (p >= out.out_bit) {
      continue;
    }
    alignas(64) word_t words[kLanes];
    _mm512_store_si512(words, ow[p][0]);
    _mm512_store_si512(words + 8, ow[p][1]);
    for (int64_t t = 0; t < count; ++t) {
      out.packed[(first + t) * out.out_bit * out.out_words + p * out.out_words + word] = words[t];
    }
    ow[p][0] = _mm512_setzero_si512();
    ow[p][1] = _mm512_setzero_si512();
  }
}

template <int BIT>
TORCH_EXT_AVX512_TARGET void conv_tiles_avx512(const Geometry& g, const word_t* x, const word_t* w,
                                               const Output& out, int64_t tile_begin, int64_t tile_end) {
  const int64_t K = g.K();
  const bool threshold = out.kind == OutKind::kThreshold;
  std::vector<word_t> buf(static_cast<size_t>(BIT * K * kLanes));  // [p][k][lane]
  std::vector<int32_t> accbuf(threshold ? 0 : static_cast<size_t>(kLanes * g.O));
  const int64_t pixels = g.pixels();
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t first = tile * kLanes;
    const int64_t count = std::min<int64_t>(kLanes, pixels - first);
    gather_lanes<BIT>(g, x, first, count, buf);
    LanePair ones_v[BIT];
    count_ones<BIT>(buf.data(), K, ones_v);
    LanePair ow[4];
    for (int p = 0; p < 4; ++p) {
      ow[p][0] = _mm512_setzero_si512();
      ow[p][1] = _mm512_setzero_si512();
    }
    for (int64_t o = 0; o < g.O; ++o) {
      LanePair acc;
      dot_lanes<BIT>(buf.data(), w + o * K, K, ones_v, acc);
      if (!threshold) {
        spill_lanes(acc, accbuf.data(), g.O, o);
        continue;
      }
      // |acc| < 2^31 (checked): the narrowing is exact.
      const __m512i acc32 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(acc[0])),
                                               _mm512_cvtepi64_epi32(acc[1]), 1);
      threshold_lanes(out, o, acc32, ow);
      if (o % kPackedWordBits == kPackedWordBits - 1 || o == g.O - 1) {
        store_words(out, first, count, o / kPackedWordBits, ow);
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

}  // namespace

template <int BIT>
void run_conv_avx512(const Geometry& g, const word_t* x, const word_t* w, const Output& out) {
  const int64_t tiles = (g.pixels() + kLanes - 1) / kLanes;
  // At least ~1M word operations (tens of microseconds) a task: small layers
  // at batch 1 stay on one thread, where waking another costs more than it
  // brings on a busy machine.
  const int64_t work = std::max<int64_t>(1, kLanes * BIT * g.K() * g.O);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / work);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    conv_tiles_avx512<BIT>(g, x, w, out, begin, end);
  });
}

template void run_conv_avx512<1>(const Geometry&, const word_t*, const word_t*, const Output&);
template void run_conv_avx512<2>(const Geometry&, const word_t*, const word_t*, const Output&);
template void run_conv_avx512<3>(const Geometry&, const word_t*, const word_t*, const Output&);
template void run_conv_avx512<4>(const Geometry&, const word_t*, const word_t*, const Output&);

}  // namespace torch_ext::cpu::packed

#endif  // TORCH_EXT_PACKED_HAVE_AVX2
