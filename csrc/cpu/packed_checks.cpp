// The argument checks of the packed family's CPU kernels (declared in
// packed_kernel.h). Every message names the operator, the argument and its
// value; tests match them.
#include "cpu/packed_kernel.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace torch_ext::cpu::packed {

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", name, " on ", t.device());
}

void check_code_bit(const char* op, const char* name, int64_t bit) {
  TORCH_CHECK_VALUE(bit >= 1 && bit <= 4, op, ": ", name, " must be in 1..4, got ", name, "=", bit);
}

void check_channels(const char* op, const char* name, int64_t channels) {
  TORCH_CHECK_VALUE(channels >= 1, op, ": ", name, " must be >= 1, got ", name, "=", channels);
}

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

void check_per_channel(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t O) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be a ", dtype, " tensor, got ", name,
                   " of dtype ", t.scalar_type());
  check_cpu(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == O, op, ": ", name, " must have shape [", O,
                    "] (one value an output channel of w), got ", name, " of shape ", t.sizes());
}

namespace {

// w: packed weights [O, kh, kw, words] for in_channels channels.
void check_packed_weights(const char* op, const at::Tensor& w, int64_t in_channels) {
  TORCH_CHECK_TYPE(w.scalar_type() == at::kLong, op, ": w must be an int64 tensor of packed weights, got w of dtype ",
                   w.scalar_type());
  check_cpu(w, op, "w");
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(0) >= 1 && w.size(1) >= 1 && w.size(2) >= 1, op,
                    ": w must have shape [O, kh, kw, words] with O, kh, kw >= 1, got w of shape ", w.sizes());
  TORCH_CHECK_VALUE(w.size(3) == packed_words(in_channels), op, ": w holds ", w.size(3),
                    " words a tap (dim 3) but in_channels=", in_channels, " needs ", packed_words(in_channels));
}

}  // namespace

Geometry check_conv(const char* op, const at::Tensor& x, const at::Tensor& w, int64_t in_channels,
                    at::IntArrayRef stride, at::IntArrayRef padding) {
  check_channels(op, "in_channels", in_channels);
  check_packed_codes(op, "x", x, in_channels);
  check_packed_weights(op, w, in_channels);
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

// A tampered tensor is refused rather than silently counted.
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

void check_threshold_arguments(const char* op, const at::Tensor& thresholds, const at::Tensor& direction,
                               int64_t O, int64_t out_bit) {
  check_code_bit(op, "out_bit", out_bit);
  const int64_t levels = (int64_t(1) << out_bit) - 1;
  TORCH_CHECK_TYPE(thresholds.scalar_type() == at::kInt, op,
                   ": thresholds must be an int32 tensor, got thresholds of dtype ", thresholds.scalar_type());
  check_cpu(thresholds, op, "thresholds");
  TORCH_CHECK_VALUE(thresholds.dim() == 2 && thresholds.size(0) == O && thresholds.size(1) == levels, op,
                    ": thresholds must have shape [", O, ", ", levels, "] (output channels of w, 2^out_bit - 1 for out_bit=",
                    out_bit, "), got thresholds of shape ", thresholds.sizes());
  check_per_channel(op, "direction", direction, at::kInt, O);
}

void check_threshold_values(const char* op, const at::Tensor& thresholds, const at::Tensor& direction) {
  const int64_t O = thresholds.size(0);
  const int64_t levels = thresholds.size(1);
  const int32_t* t = thresholds.const_data_ptr<int32_t>();
  const int32_t* d = direction.const_data_ptr<int32_t>();
  for (int64_t o = 0; o < O; ++o) {
    TORCH_CHECK_VALUE(d[o] == 1 || d[o] == -1, op, ": direction must hold +1 or -1, got direction[", o, "]=", d[o]);
    for (int64_t k = 1; k < levels; ++k) {
      TORCH_CHECK_VALUE(t[o * levels + k - 1] <= t[o * levels + k], op,
                        ": thresholds must ascend along dim 1, got thresholds[", o, "]=", thresholds[o]);
    }
  }
}

}  // namespace torch_ext::cpu::packed
