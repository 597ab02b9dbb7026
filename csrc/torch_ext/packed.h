// Bit-packed low-bit inference: activation codes as bit-planes, binary
// weights as sign bits, and a convolution whose integer accumulator is
// exactly sum(sign(w) * code) (docs/deploy.md). CPU kernels only.
//
// Layouts (all int64 tensors, whose 64-bit words are read as unsigned bits):
//
//   packed codes    [N, H, W, bit, words], words = ceil(C / 64): channel c
//                   is bit (c % 64) of word (c / 64); plane p holds bit p of
//                   the code (value = sum_p 2^p * plane_p). Channels >= C
//                   (the padding of the last word) are 0 (code 0).
//   packed weights  [O, kh, kw, words]: bit set where w >= 0 (sign +1),
//                   clear where w < 0 (sign -1, NaN included); the padding
//                   bits of the last word are 0.
//
// Every function calls through the dispatcher (torch.ops.torch_ext.*).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torch_ext {

// Codes per word of the packed layouts.
constexpr int64_t kPackedWordBits = 64;

inline int64_t packed_words(int64_t channels) {
  return (channels + kPackedWordBits - 1) / kPackedWordBits;
}

// uint8 codes [N, C, H, W] in 0..2^bit-1 (bit 1..4) -> packed codes.
at::Tensor pack_codes(const at::Tensor& codes, int64_t bit);
// float32 [N, C, H, W] -> packed codes of quantize_to_codes(x, bit, max_value)
// (docs/quantizer.md), without the uint8 tensor in between.
at::Tensor quantize_pack_codes(const at::Tensor& x, int64_t bit, double max_value);
// packed codes -> uint8 codes [N, channels, H, W].
at::Tensor unpack_codes(const at::Tensor& packed, int64_t channels);
// Floating weight [O, I, kh, kw] -> packed sign bits [O, kh, kw, words(I)].
at::Tensor pack_binary_weights(const at::Tensor& weight);
// Space-to-depth (TensorFlow's channel order: output channel
// (dy * block + dx) * channels + c) on packed codes.
at::Tensor packed_space_to_depth(const at::Tensor& packed, int64_t channels, int64_t block);

// The convolution of packed codes x (in_channels channels) with packed
// weights w, zero padding, groups 1. acc[n, o, y, x] = sum(sign(w) * code).
// Returns int32 [N, O, Ho, Wo].
at::Tensor packed_conv2d(
    const at::Tensor& x, const at::Tensor& w, int64_t in_channels, at::IntArrayRef stride,
    at::IntArrayRef padding);
// float32 [N, O, Ho, Wo]: float(acc) * scale[o] + bias[o] (two roundings, no FMA).
at::Tensor packed_conv2d_affine(
    const at::Tensor& x, const at::Tensor& w, int64_t in_channels, at::IntArrayRef stride,
    at::IntArrayRef padding, const at::Tensor& scale, const at::Tensor& bias);
// Packed codes [N, Ho, Wo, out_bit, words(O)]: the code of channel o is the
// number of k with direction[o] * acc >= thresholds[o, k]
// (thresholds int32 [O, 2^out_bit - 1], ascending; direction int32 [O], +1 or -1).
at::Tensor packed_conv2d_threshold(
    const at::Tensor& x, const at::Tensor& w, int64_t in_channels, at::IntArrayRef stride,
    at::IntArrayRef padding, const at::Tensor& thresholds, const at::Tensor& direction, int64_t out_bit);

}  // namespace torch_ext
