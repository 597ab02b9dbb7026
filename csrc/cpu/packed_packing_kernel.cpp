// The packing operators of the packed family on the CPU (layouts in
// csrc/torch_ext/packed.h): pack_codes, quantize_pack_codes, unpack_codes,
// packed_space_to_depth and pack_binary_weights.
#include "cpu/packed_kernel.h"

#include "torch_ext/formula.h"
#include "torch_ext/torch_ext.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace torch_ext::cpu::packed {
namespace {

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

// ---------------------------------------------------------------------------
// quantize_pack_codes: float32 [N, C, H, W] -> packed codes, the code of each
// element formula::code (docs/quantizer.md, float32 steps: clip, divide by m,
// multiply by n, add 0.5, floor; NaN gives code 0), as
// torch_ext.quantize_to_codes computes it.
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
      // The quantizer's own code (formula.h), each step rounded in float.
      o[j] = static_cast<uint8_t>(static_cast<int32_t>(formula::code(s[j], a.m, a.n)));
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

void quantize_pack_chunk(IsaCap isa, const QuantizePackArgs& a, uint8_t* cj, uint8_t* jc) {
#ifdef TORCH_EXT_PACKED_HAVE_AVX2
  if (isa == kIsaAvx512) {
    quantize_pack_avx512(a, cj, jc);
    return;
  }
  if (isa == kIsaAvx2) {
    quantize_pack_avx2(a, cj, jc);
    return;
  }
#endif
  (void)isa;
  quantize_pack_baseline(a, cj, jc);
}

void check_quantize_pack_arguments(const char* op, const at::Tensor& x, int64_t bit, double max_value) {
  check_code_bit(op, "bit", bit);
  check_max_value(max_value, at::kFloat, op);  // float32's: x is float32
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, op, ": x must be a float32 tensor, got x of dtype ",
                   x.scalar_type());
  check_cpu(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) >= 1, op,
                    ": x must have shape [N, C, H, W] with C >= 1, got x of shape ", x.sizes());
}

at::Tensor quantize_pack_codes_cpu(const at::Tensor& x_in, int64_t bit, double max_value) {
  check_quantize_pack_arguments("quantize_pack_codes", x_in, bit, max_value);
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t HW = H * W;
  const int64_t words = packed_words(C);
  at::Tensor out = at::empty({N, H, W, bit, words}, x.options().dtype(at::kLong));
  if (out.numel() == 0) {
    return out;
  }
  // m and n as the quantizer rounds them to its float32 compute type.
  const auto params = formula::make_params<float>(bit, max_value);
  const float* src = x.const_data_ptr<float>();
  auto* dst = reinterpret_cast<word_t*>(out.data_ptr<int64_t>());
  const int64_t chunks_per_image = (HW + kQChunk - 1) / kQChunk;
  const IsaCap isa = packed_isa();  // as the convolution
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
      a.m = params.max_value;
      a.n = params.levels;
      a.dst = dst + (nimg * HW + a.start) * bit * words;
      quantize_pack_chunk(isa, a, cj.data(), jc.data());
    }
  });
  return out;
}

// ---------------------------------------------------------------------------

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
}  // namespace torch_ext::cpu::packed

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("pack_codes", &torch_ext::cpu::packed::pack_codes_cpu);
  m.impl("quantize_pack_codes", &torch_ext::cpu::packed::quantize_pack_codes_cpu);
  m.impl("unpack_codes", &torch_ext::cpu::packed::unpack_codes_cpu);
  m.impl("pack_binary_weights", &torch_ext::cpu::packed::pack_binary_weights_cpu);
  m.impl("packed_space_to_depth", &torch_ext::cpu::packed::packed_space_to_depth_cpu);
}
