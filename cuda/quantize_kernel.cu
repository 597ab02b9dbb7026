// CUDA kernels of the linear mid-tread half quantizer (the fixed quantizer
// family: schemas, checks and autograd in csrc/ops/quantize.cpp).
//
// The memory path is tiles.cuh (128-bit accesses, a warp's accesses
// contiguous, 64 bytes in flight a thread, 64-bit indices, grid-stride); the
// math is forms.cuh: for 1 to 4 bits the forward compares x with thresholds
// found once a call on the host (steps.h) and never divides. Every form is
// bit-identical to formula.h, as the CPU kernels are (this file is also
// compiled with -fmad=false for the formula form's steps).
#include "forms.cuh"
#include "tiles.cuh"

#include "torch_ext/formula.h"
#include "torch_ext/layouts.h"
#include "torch_ext/torch_ext.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

namespace torch_ext {
namespace cuda {
namespace {

using cuda_tiles::bits_t;
using cuda_tiles::kThreads;
using cuda_tiles::kVecs;
using cuda_tiles::Tile;
using formula::compute_t;

// x and y may be the same memory (in place): not __restrict__. Each thread
// loads its whole tile before it computes and stores (so in place is safe).
template <typename scalar_t, bool kWriteMask, typename Form>
__global__ void __launch_bounds__(kThreads, cuda_tiles::kMinBlocks) forward_kernel(
    const scalar_t* x, scalar_t* y, uint8_t* mask, int64_t numel, bool aligned, Form form) {
  using T = compute_t<scalar_t>;
  cuda_tiles::for_each_tile<scalar_t>(numel, aligned, [&](int64_t t, auto full) {
    constexpr bool kFull = decltype(full)::value;
    cuda_forms::quantize_tile<kFull>(form, x, y, t, numel, [&](int k, const auto& xv) {
      if (kWriteMask) {
        const T m = form.max_value();
        const uint32_t bits = cuda_tiles::bits_where(xv, [m](T v) { return formula::passes_gradient(v, m); });
        cuda_tiles::store_mask_bits<kFull, scalar_t>(mask, t, k, numel, bits);
      }
    });
  });
}

// grad_x = grad_y where the mask bit is set, else +0: raw bits are selected,
// so -0.0, infinities and NaN payloads of grad_y pass unchanged.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, cuda_tiles::kMinBlocks) backward_kernel(
    const scalar_t* grad_y, scalar_t* grad_x, const uint8_t* __restrict__ mask, int64_t numel, bool aligned) {
  using B = bits_t<scalar_t>;
  using Tl = Tile<scalar_t>;
  cuda_tiles::for_each_tile<scalar_t>(numel, aligned, [&](int64_t t, auto full) {
    constexpr bool kFull = decltype(full)::value;
    uint32_t bits[kVecs];
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      bits[k] = cuda_tiles::load_mask_bits<kFull, scalar_t>(mask, t, k, numel);
    }
    B v[Tl::kThreadElems];
    cuda_tiles::load_tile<kFull>(grad_y, t, numel, v);
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
#pragma unroll
      for (int j = 0; j < Tl::kVecElems; ++j) {
        v[k * Tl::kVecElems + j] &= B(0) - static_cast<B>((bits[k] >> j) & 1u);
      }
    }
    cuda_tiles::store_tile<kFull>(grad_x, t, numel, v);
  });
}

template <typename scalar_t, typename Form>
void launch_forward(const scalar_t* x, scalar_t* y, uint8_t* mask, int64_t numel, c10::DeviceIndex device,
                    double max_value, int levels) {
  const Form form = cuda_forms::make_form(static_cast<Form*>(nullptr), static_cast<compute_t<scalar_t>>(max_value), levels);
  const int64_t grid = cuda_tiles::grid_for<scalar_t>(numel, device);
  const bool aligned = cuda_tiles::aligned16(x) && cuda_tiles::aligned16(y);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (mask != nullptr) {
    forward_kernel<scalar_t, true, Form><<<grid, kThreads, 0, stream>>>(x, y, mask, numel, aligned, form);
  } else {
    forward_kernel<scalar_t, false, Form><<<grid, kThreads, 0, stream>>>(x, y, nullptr, numel, aligned, form);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The flat kernel of layouts.h.
struct ForwardKernel {
  int64_t bit;
  double max_value;
  void operator()(const at::Tensor& src, const at::Tensor& dst, uint8_t* mask) const {
    const int64_t numel = src.numel();
    const c10::DeviceIndex device = src.device().index();
    const int levels = bit == 32 ? 1 : static_cast<int>((int64_t{1} << bit) - 1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "linear_mid_tread_half_quantize_cuda", [&] {
      const scalar_t* x = static_cast<const scalar_t*>(src.const_data_ptr());
      scalar_t* y = static_cast<scalar_t*>(dst.data_ptr());
      cuda_forms::with_form<scalar_t>(bit, [&](auto* form) {
        using Form = std::remove_pointer_t<decltype(form)>;
        launch_forward<scalar_t, Form>(x, y, mask, numel, device, max_value, levels);
      });
    });
  }
};

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "linear_mid_tread_half_quantize: ", name, " must be a CUDA tensor, got ", t.device());
}

at::Tensor quantize_cuda(const at::Tensor& x, int64_t bit, double max_value) {
  check_quantize_arguments(x.scalar_type(), bit, max_value);
  check_cuda(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  return layouts::quantize(x, ForwardKernel{bit, max_value});
}

void quantize_cuda_(at::Tensor& x, int64_t bit, double max_value) {
  check_quantize_arguments(x.scalar_type(), bit, max_value);
  check_cuda(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  layouts::quantize_(x, ForwardKernel{bit, max_value});
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, int64_t bit, double max_value) {
  check_quantize_arguments(x.scalar_type(), bit, max_value);
  check_cuda(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  return layouts::forward(x, ForwardKernel{bit, max_value});
}

at::Tensor forward_cuda_(at::Tensor& x, int64_t bit, double max_value) {
  check_quantize_arguments(x.scalar_type(), bit, max_value);
  check_cuda(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  return layouts::forward_(x, ForwardKernel{bit, max_value});
}

at::Tensor backward_cuda(const at::Tensor& grad_y, const at::Tensor& mask, at::OptionalSymIntArrayRef x_strides) {
  check_backward_arguments(grad_y, mask);
  check_cuda(grad_y, "grad_y");
  c10::cuda::CUDAGuard guard(grad_y.device());
  return layouts::backward(grad_y, mask, x_strides, [](const at::Tensor& g, const at::Tensor& out, const uint8_t* m) {
    const int64_t numel = g.numel();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "linear_mid_tread_half_quantize_backward_cuda", [&] {
      const scalar_t* src = static_cast<const scalar_t*>(g.const_data_ptr());
      scalar_t* dst = static_cast<scalar_t*>(out.data_ptr());
      const int64_t grid = cuda_tiles::grid_for<scalar_t>(numel, g.device().index());
      backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          src, dst, m, numel, cuda_tiles::aligned16(src) && cuda_tiles::aligned16(dst));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace cuda
}  // namespace torch_ext

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("linear_mid_tread_half_quantize", &torch_ext::cuda::quantize_cuda);
  m.impl("linear_mid_tread_half_quantize_", &torch_ext::cuda::quantize_cuda_);
  m.impl("linear_mid_tread_half_quantize_forward", &torch_ext::cuda::forward_cuda);
  m.impl("linear_mid_tread_half_quantize_forward_", &torch_ext::cuda::forward_cuda_);
  m.impl("linear_mid_tread_half_quantize_backward", &torch_ext::cuda::backward_cuda);
}
