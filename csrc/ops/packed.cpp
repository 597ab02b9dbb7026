// The packed / deploy family (csrc/torch_ext/packed.h, docs/deploy.md):
// bit-packed codes and weights and the W1A2 convolutions on them, for
// inference only (no autograd: nothing is differentiable here). Here: the
// schemas and the C++ entry points. The CPU kernels and their argument
// checks are csrc/cpu/packed_*.cpp; there is no CUDA kernel.
#include "ops/find_op.h"
#include "torch_ext/packed.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(torch_ext, m) {
  m.def("pack_codes(Tensor codes, int bit) -> Tensor");
  m.def("quantize_pack_codes(Tensor x, int bit, float max_value) -> Tensor");
  m.def("unpack_codes(Tensor packed, int channels) -> Tensor");
  m.def("pack_binary_weights(Tensor weight) -> Tensor");
  m.def("packed_space_to_depth(Tensor packed, int channels, int block) -> Tensor");
  m.def("packed_conv2d(Tensor x, Tensor w, int in_channels, int[2] stride, int[2] padding) -> Tensor");
  m.def(
      "packed_conv2d_affine(Tensor x, Tensor w, int in_channels, int[2] stride, int[2] padding, "
      "Tensor scale, Tensor bias) -> Tensor");
  m.def(
      "packed_conv2d_threshold(Tensor x, Tensor w, int in_channels, int[2] stride, int[2] padding, "
      "Tensor thresholds, Tensor direction, int out_bit) -> Tensor");
}

namespace torch_ext {

using ops::find_op;

at::Tensor pack_codes(const at::Tensor& codes, int64_t bit) {
  static auto op = find_op("torch_ext::pack_codes").typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(codes, bit);
}

at::Tensor quantize_pack_codes(const at::Tensor& x, int64_t bit, double max_value) {
  static auto op =
      find_op("torch_ext::quantize_pack_codes").typed<at::Tensor(const at::Tensor&, int64_t, double)>();
  return op.call(x, bit, max_value);
}

at::Tensor unpack_codes(const at::Tensor& packed, int64_t channels) {
  static auto op = find_op("torch_ext::unpack_codes").typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(packed, channels);
}

at::Tensor pack_binary_weights(const at::Tensor& weight) {
  static auto op = find_op("torch_ext::pack_binary_weights").typed<at::Tensor(const at::Tensor&)>();
  return op.call(weight);
}

at::Tensor packed_space_to_depth(const at::Tensor& packed, int64_t channels, int64_t block) {
  static auto op =
      find_op("torch_ext::packed_space_to_depth").typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  return op.call(packed, channels, block);
}

at::Tensor packed_conv2d(const at::Tensor& x, const at::Tensor& w, int64_t in_channels, at::IntArrayRef stride,
                         at::IntArrayRef padding) {
  static auto op = find_op("torch_ext::packed_conv2d")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef,
                                         at::IntArrayRef)>();
  return op.call(x, w, in_channels, stride, padding);
}

at::Tensor packed_conv2d_affine(const at::Tensor& x, const at::Tensor& w, int64_t in_channels,
                                at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& scale,
                                const at::Tensor& bias) {
  static auto op = find_op("torch_ext::packed_conv2d_affine")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef,
                                         at::IntArrayRef, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, w, in_channels, stride, padding, scale, bias);
}

at::Tensor packed_conv2d_threshold(const at::Tensor& x, const at::Tensor& w, int64_t in_channels,
                                   at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& thresholds,
                                   const at::Tensor& direction, int64_t out_bit) {
  static auto op = find_op("torch_ext::packed_conv2d_threshold")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef,
                                         at::IntArrayRef, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(x, w, in_channels, stride, padding, thresholds, direction, out_bit);
}

}  // namespace torch_ext
