// Public C++ API of torch_ext: Blueoil's linear mid-tread half quantizer as a
// PyTorch operator. The math is docs/quantizer.md; every function here calls
// through the dispatcher, so it is differentiable and runs on every device
// that has a registered kernel (CPU always, CUDA when built with it).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace torch_ext {

// y = (floor((clip(x, 0, m) / m) * n + 0.5) / n) * m, n = 2^bit - 1 (bit == 32:
// clip only), with the straight-through gradient for 0 < x < m.
at::Tensor linear_mid_tread_half_quantize(const at::Tensor& x, int64_t bit, double max_value);

// In place, like torch::relu_: x is overwritten; the gradient is still the
// mask of the original x.
at::Tensor& linear_mid_tread_half_quantize_(at::Tensor& x, int64_t bit, double max_value);

// The kernels the differentiable operator is made of. The forward returns y
// and the gradient mask `0 < x < m`, packed 8 elements a byte in the MEMORY
// order of y (bit j of byte b is the element at memory offset 8*b + j of y,
// whose layout is x's own when x is dense: contiguous, channels_last, any
// permutation): a uint8 tensor of mask_numel(x.numel()) elements. Pass
// y.strides() to the backward.
std::tuple<at::Tensor, at::Tensor> linear_mid_tread_half_quantize_forward(
    const at::Tensor& x, int64_t bit, double max_value);
// Writes y into x and returns the mask of the original x, in x's memory order
// when x is dense (pass x.strides() to the backward), in row-major order
// otherwise (pass the strides of x.contiguous()).
at::Tensor linear_mid_tread_half_quantize_forward_(at::Tensor& x, int64_t bit, double max_value);
// grad_x = grad_y where the mask is set, exactly 0 elsewhere. With x_strides
// (the strides of the dense layout the mask follows, see above), grad_x has
// that layout, and grad_y is copied (once) only when it has another one.
// Without, the mask is in row-major order (that of a contiguous x) and
// grad_x is laid out like grad_y.
at::Tensor linear_mid_tread_half_quantize_backward(const at::Tensor& grad_y, const at::Tensor& mask);
at::Tensor linear_mid_tread_half_quantize_backward(
    const at::Tensor& grad_y, const at::Tensor& mask, at::IntArrayRef x_strides);
// The same with symbolic strides (tracing); ATen's _symint naming.
at::Tensor linear_mid_tread_half_quantize_backward_symint(
    const at::Tensor& grad_y, const at::Tensor& mask, c10::SymIntArrayRef x_strides);

// Throws c10::ValueError (bit, max_value) or c10::TypeError (dtype), with a
// message naming the argument and its value, exactly as docs/quantizer.md refuses them
// (check_quantize_arguments includes check_max_value(max_value, dtype)).
void check_quantize_arguments(at::ScalarType dtype, int64_t bit, double max_value);
void check_bit(int64_t bit);
// op: the operator the message names.
void check_max_value(double max_value, const char* op = "linear_mid_tread_half_quantize");
// max_value for an x of this dtype: also refused (ValueError) where it rounds
// to 0 or to infinity in x's compute type (float32 unless x is float64).
void check_max_value(double max_value, at::ScalarType dtype, const char* op = "linear_mid_tread_half_quantize");
// The backward's arguments: a floating grad_y and a uint8 mask of
// mask_numel(grad_y.numel()) elements on the same device.
void check_backward_arguments(const at::Tensor& grad_y, const at::Tensor& mask);
// x_strides of the backward: one a dim of grad_y, describing a dense layout
// of grad_y's sizes (c10::ValueError otherwise).
void check_backward_strides(const at::Tensor& grad_y, at::IntArrayRef x_strides);

// Throws, as ATen's in-place ops do, when writing into x in place would break
// autograd (x is a leaf that requires grad, or a view of one).
void check_inplace_allowed(const at::Tensor& x);

// Bytes of packed mask for `numel` elements.
inline int64_t mask_numel(int64_t numel) {
  return (numel + 7) / 8;
}

// Whether this build registered CUDA kernels.
bool built_with_cuda();

}  // namespace torch_ext
