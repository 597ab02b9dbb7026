// The convolution of the packed family (csrc/torch_ext/packed.h,
// docs/deploy.md): packed_conv2d, packed_conv2d_affine and
// packed_conv2d_threshold on the CPU.
//
// It is a binary GEMM over an on-the-fly im2col of one tile of output pixels:
// for each pixel the kh * kw taps of every bit-plane are gathered into
// K = kh * kw * words contiguous words (taps outside the image are zero
// words: code 0 contributes nothing), and for each output channel
//
//   acc = sum_p 2^p * (2 * popcount(a_p & w) - popcount(a_p))
//
// which is sum(sign(w) * code) exactly: a channel whose code has bit p set
// adds +2^p where its weight bit is set (w >= 0) and -2^p where it is clear.
// popcount(a_p) does not depend on the output channel and is counted once a
// pixel. The loops here are compiled twice, for the baseline x86-64 ISA
// (popcount in software) and for AVX2 + POPCNT; a third copy for AVX-512
// with VPOPCNTQ is packed_conv_avx512_kernel.cpp. The copy is picked once a
// call at run time like the quantizer's kernels; the results are the same
// integers either way.
#include "cpu/packed_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace torch_ext::cpu::packed {
namespace {

// Output pixels computed together: each weight word is loaded once for all.
constexpr int kTile = 4;

// Gathers the pixel at `pos` into buf[p * K + k] for each plane p; returns
// the popcounts of each plane in ones[p].
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

#ifdef TORCH_EXT_PACKED_HAVE_AVX2
template <int BIT>
__attribute__((target("avx2,popcnt"))) void conv_tiles_avx2(const Geometry& g, const word_t* x, const word_t* w,
                                                             const Output& out, int64_t b, int64_t e) {
  conv_tiles<BIT>(g, x, w, out, b, e);
}
#endif

template <int BIT>
void run_conv_bit(const Geometry& g, const word_t* x, const word_t* w, const Output& out) {
  const IsaCap isa = packed_isa();
#ifdef TORCH_EXT_PACKED_HAVE_AVX2
  if (isa == kIsaAvx512) {
    run_conv_avx512<BIT>(g, x, w, out);
    return;
  }
#endif
  const int64_t tiles = (g.pixels() + kTile - 1) / kTile;
  // About 64k word operations a task at least.
  const int64_t work = std::max<int64_t>(1, kTile * BIT * g.K() * g.O);
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  const bool avx2 = isa == kIsaAvx2;
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

// The weights in the gathered layout (taps back to back, see Geometry::K),
// once a call.
std::vector<word_t> compact_weights(const Geometry& g, const word_t* w) {
  const int64_t K = g.K();
  const int64_t taps = g.kh * g.kw;
  std::vector<word_t> compact(static_cast<size_t>(g.O * K), 0);
  for (int64_t o = 0; o < g.O; ++o) {
    for (int64_t tap = 0; tap < taps; ++tap) {
      or_bits(compact.data() + o * K, tap * g.C, w + (o * taps + tap) * g.words, g.C);
    }
  }
  return compact;
}

// x and w contiguous, checked.
void run_conv(const Geometry& g, const at::Tensor& x, const at::Tensor& w, const Output& out) {
  if (g.pixels() == 0 || g.O == 0) {
    return;
  }
  const auto* xp = reinterpret_cast<const word_t*>(x.const_data_ptr<int64_t>());
  const auto* wp = reinterpret_cast<const word_t*>(w.const_data_ptr<int64_t>());
  std::vector<word_t> compact;
  if (!g.dense()) {
    compact = compact_weights(g, wp);
    wp = compact.data();
  }
  switch (g.bit) {
    case 1: run_conv_bit<1>(g, xp, wp, out); break;
    case 2: run_conv_bit<2>(g, xp, wp, out); break;
    case 3: run_conv_bit<3>(g, xp, wp, out); break;
    default: run_conv_bit<4>(g, xp, wp, out); break;
  }
}

// ---------------------------------------------------------------------------
// The operators.

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
  check_threshold_arguments(op, thresholds_in, direction_in, g.O, out_bit);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  const at::Tensor thresholds = thresholds_in.contiguous();
  const at::Tensor direction = direction_in.contiguous();
  check_weight_padding(op, w, in_channels);
  check_threshold_values(op, thresholds, direction);
  const int64_t out_words = packed_words(g.O);
  at::Tensor y = at::empty({g.N, g.Ho, g.Wo, out_bit, out_words}, x.options().dtype(at::kLong));
  Output out{OutKind::kThreshold};
  out.packed = reinterpret_cast<word_t*>(y.data_ptr<int64_t>());
  out.thresholds = thresholds.const_data_ptr<int32_t>();
  out.direction = direction.const_data_ptr<int32_t>();
  out.out_bit = out_bit;
  out.levels = (int64_t(1) << out_bit) - 1;
  out.out_words = out_words;
  run_conv(g, x, w, out);
  return y;
}

}  // namespace
}  // namespace torch_ext::cpu::packed

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("packed_conv2d", &torch_ext::cpu::packed::packed_conv2d_cpu);
  m.impl("packed_conv2d_affine", &torch_ext::cpu::packed::packed_conv2d_affine_cpu);
  m.impl("packed_conv2d_threshold", &torch_ext::cpu::packed::packed_conv2d_threshold_cpu);
}
