// Device-independent host glue shared by the CPU and the CUDA kernels: it
// allocates the outputs with the layout PyTorch users expect (empty_like keeps
// every dense layout: contiguous, channels_last, channels_last_3d, any
// permutation) and hands the kernels flat, dense memory, so that the kernels
// themselves only ever walk one contiguous span.
//
// A flat kernel is called as kernel(src, dst, mask) where src and dst have the
// same dense layout and `numel` elements starting at data_ptr() (src and dst
// may be the same memory), and mask is nullptr or points to
// mask_numel(numel) bytes. The packed mask follows that span, i.e. the MEMORY
// order of the dense tensor the kernel ran on (bit j of byte b: memory offset
// 8*b + j), so a dense input of any layout is never copied; the backward is
// told that layout (x_strides) to map grad_y onto it (docs/quantizer.md).
#pragma once

#include "torch_ext/torch_ext.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/SymInt.h>

#include <vector>

namespace torch_ext {
namespace layouts {

inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.is_non_overlapping_and_dense() && a.strides() == b.strides();
}

// Inference tensors carry no autograd keys, so in-place calls on them come
// straight to the kernels: refuse them here, outside inference mode, as
// torch.relu_ does. (Normal tensors are checked by the Autograd kernels,
// through check_inplace_allowed, which calls this too: the one message.)
inline void check_inference_tensor_writable(const at::Tensor& x) {
  TORCH_CHECK(
      !x.is_inference() || c10::InferenceMode::is_enabled(),
      "linear_mid_tread_half_quantize_: Inplace update to inference tensor outside InferenceMode is not "
      "allowed. You can make a clone to get a normal tensor before doing inplace update.");
}

// y = f(x), no mask: works in memory order whenever x is dense (contiguous,
// channels_last, any permutation), so no copy is made for those.
template <typename Kernel>
at::Tensor quantize(const at::Tensor& x, Kernel&& kernel) {
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) {
    return y;
  }
  if (same_dense_layout(x, y)) {
    kernel(x, y, nullptr);
    return y;
  }
  // Not dense: one copy, into y (dense, in x's stride order), quantized there.
  TORCH_INTERNAL_ASSERT(y.is_non_overlapping_and_dense(), "empty_like gave a layout that is not dense");
  y.copy_(x);
  kernel(y, y, nullptr);
  return y;
}

// x = f(x), no mask.
template <typename Kernel>
void quantize_(at::Tensor& x, Kernel&& kernel) {
  check_inference_tensor_writable(x);
  if (x.numel() == 0) {
    return;
  }
  if (x.is_non_overlapping_and_dense()) {
    kernel(x, x, nullptr);
    return;
  }
  at::Tensor xc = x.contiguous();
  kernel(xc, xc, nullptr);
  x.copy_(xc);
}

inline at::Tensor empty_mask(const at::Tensor& x) {
  return at::empty({mask_numel(x.numel())}, x.options().dtype(at::kByte));
}

// Whether two tensors of the same sizes map every index to the same memory
// offset: the strides of dims of size 1 never matter.
inline bool same_memory_order(at::IntArrayRef sizes, at::IntArrayRef a, at::IntArrayRef b) {
  if (a.size() != b.size() || a.size() != sizes.size()) {
    return false;
  }
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] != 1 && a[d] != b[d]) {
      return false;
    }
  }
  return true;
}

// (y, mask) = f(x). y = empty_like(x) is dense for every strided x (x's own
// strides when x is dense, else strides inferred in x's stride order), and the
// mask follows y's memory order: a dense x is read where it lies, a non-dense
// x is copied once, into y, and quantized there in place.
template <typename Kernel>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, Kernel&& kernel) {
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = empty_mask(x);
  if (x.numel() == 0) {
    return {y, mask};
  }
  TORCH_INTERNAL_ASSERT(y.is_non_overlapping_and_dense(), "empty_like gave a layout that is not dense");
  if (same_dense_layout(x, y)) {
    kernel(x, y, mask.data_ptr<uint8_t>());
    return {y, mask};
  }
  y.copy_(x);
  kernel(y, y, mask.data_ptr<uint8_t>());
  return {y, mask};
}

// mask = f(x) with y written into x. The mask follows x's memory order when x
// is dense, and row-major order otherwise (x goes through one contiguous
// copy and back): inplace_mask_strides gives the strides of that order.
template <typename Kernel>
at::Tensor forward_(at::Tensor& x, Kernel&& kernel) {
  check_inference_tensor_writable(x);
  at::Tensor mask = empty_mask(x);
  if (x.numel() == 0) {
    return mask;
  }
  if (x.is_non_overlapping_and_dense()) {
    kernel(x, x, mask.data_ptr<uint8_t>());
    return mask;
  }
  at::Tensor xc = x.contiguous();
  kernel(xc, xc, mask.data_ptr<uint8_t>());
  x.copy_(xc);
  return mask;
}

// The strides that describe the mask order of forward_(x) (see above), as
// SymInts so that the autograd Function can record them while tracing.
inline std::vector<c10::SymInt> inplace_mask_strides(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) {
    return x.sym_strides().vec();
  }
  // Row-major strides, as x.contiguous() makes them (a dim of size 0 or 1
  // counts as 1).
  const auto sizes = x.sym_sizes();
  std::vector<c10::SymInt> strides(sizes.size());
  c10::SymInt stride = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = stride;
    stride = stride * sizes[d].max(1);
  }
  return strides;
}

// grad_x = mask ? grad_y : 0 for a mask in row-major order (no x_strides
// given: the mask of a contiguous x), laid out like grad_y.
template <typename Kernel>
at::Tensor backward(const at::Tensor& grad_y, const at::Tensor& mask, Kernel&& kernel) {
  at::Tensor grad_x = at::empty_like(grad_y);
  if (grad_y.numel() == 0) {
    return grad_x;
  }
  const at::Tensor gc = grad_y.contiguous();
  const at::Tensor mc = mask.contiguous();
  if (grad_x.is_contiguous()) {
    kernel(gc, grad_x, mc.data_ptr<uint8_t>());
  } else {
    at::Tensor out = at::empty_like(gc);
    kernel(gc, out, mc.data_ptr<uint8_t>());
    grad_x.copy_(out);
  }
  return grad_x;
}

// grad_x = mask ? grad_y : 0 for a mask in the memory order of a dense x with
// strides x_strides; grad_x has x's layout (as autograd's layout contract
// for a leaf's .grad wants it). grad_y is read where it lies when it has that
// layout, and otherwise copied once, into grad_x, and masked there in place.
template <typename Kernel>
at::Tensor backward_strided(
    const at::Tensor& grad_y, const at::Tensor& mask, at::IntArrayRef x_strides, Kernel&& kernel) {
  check_backward_strides(grad_y, x_strides);
  at::Tensor grad_x = at::empty_strided(grad_y.sizes(), x_strides, grad_y.options());
  if (grad_y.numel() == 0) {
    return grad_x;
  }
  const at::Tensor mc = mask.contiguous();
  if (grad_y.is_non_overlapping_and_dense() &&
      same_memory_order(grad_y.sizes(), grad_y.strides(), x_strides)) {
    kernel(grad_y, grad_x, mc.data_ptr<uint8_t>());
    return grad_x;
  }
  grad_x.copy_(grad_y);
  kernel(grad_x, grad_x, mc.data_ptr<uint8_t>());
  return grad_x;
}

// The backward op: x_strides given or not (see above).
template <typename Kernel>
at::Tensor backward(
    const at::Tensor& grad_y, const at::Tensor& mask, at::OptionalSymIntArrayRef x_strides, Kernel&& kernel) {
  if (!x_strides.has_value()) {
    return backward(grad_y, mask, std::forward<Kernel>(kernel));
  }
  return backward_strided(grad_y, mask, C10_AS_INTARRAYREF_SLOW(*x_strides), std::forward<Kernel>(kernel));
}

}  // namespace layouts
}  // namespace torch_ext
