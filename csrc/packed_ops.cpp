// C++ entry points of the bit-packed inference operators (csrc/torch_ext/packed.h):
// each calls its operator through the dispatcher. The schemas are in ops.cpp.
#include "torch_ext/packed.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torch_ext {
namespace {

c10::OperatorHandle packed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

}  // namespace

at::Tensor pack_codes(const at::Tensor& codes, int64_t bit) {
  static auto op = packed_op("torch_ext::pack_codes").typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(codes, bit);
}

at::Tensor quantize_pack_codes(const at::Tensor& x, int64_t bit, double max_value) {
  static auto op =
      packed_op("torch_ext::quantize_pack_codes").typed<at::Tensor(const at::Tensor&, int64_t, double)>();
  return op.call(x, bit, max_value);
}

at::Tensor unpack_codes(const at::Tensor& packed, int64_t channels) {
  static auto op = packed_op("torch_ext::unpack_codes").typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(packed, channels);
}

at::Tensor pack_binary_weights(const at::Tensor& weight) {
  static auto op = packed_op("torch_ext::pack_binary_weights").typed<at::Tensor(const at::Tensor&)>();
  return op.call(weight);
}

at::Tensor packed_space_to_depth(const at::Tensor& packed, int64_t channels, int64_t block) {
  static auto op =
      packed_op("torch_ext::packed_space_to_depth").typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  return op.call(packed, channels, block);
}

at::Tensor packed_conv2d(const at::Tensor& x, const at::Tensor& w, int64_t in_channels, at::IntArrayRef stride,
                         at::IntArrayRef padding) {
  static auto op = packed_op("torch_ext::packed_conv2d")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef,
                                         at::IntArrayRef)>();
  return op.call(x, w, in_channels, stride, padding);
}

at::Tensor packed_conv2d_affine(const at::Tensor& x, const at::Tensor& w, int64_t in_channels,
                                at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& scale,
                                const at::Tensor& bias) {
  static auto op = packed_op("torch_ext::packed_conv2d_affine")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef,
                                         at::IntArrayRef, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, w, in_channels, stride, padding, scale, bias);
}

at::Tensor packed_conv2d_threshold(const at::Tensor& x, const at::Tensor& w, int64_t in_channels,
                                   at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& thresholds,
                                   const at::Tensor& direction, int64_t out_bit) {
  static auto op = packed_op("torch_ext::packed_conv2d_threshold")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef,
                                         at::IntArrayRef, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(x, w, in_channels, stride, padding, thresholds, direction, out_bit);
}

}  // namespace torch_ext
