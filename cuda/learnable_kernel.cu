// CUDA kernels of the learnable-max_value operators (csrc/torch_ext/learnable.h;
// schemas, checks and autograd in csrc/ops/learnable.cpp).
//
// m is read by the kernels from the 0-dim max_value tensor (converted to the
// compute type T of x by a device-side copy when its dtype differs) and
// clamped there by learnable::effective_max_value: nothing is read on the
// host, so nothing synchronises. Each block builds the form of the forward
// from m once, in shared memory (forms.cuh: for 1 to 4 bits the thresholds
// of steps.h, each searched by one warp), so y is bit-identical to
// linear_mid_tread_half_quantize(x, bit, m) on either device, with no
// division in the loop. The memory path is the fixed operator's (tiles.cuh).
//
// grad_max_value is summed in two passes with no atomics: each block of the
// first kernel sums its elements (a fixed grid-stride assignment that depends
// on the element count and the device only) in double and reduces them in
// shared memory in a fixed tree order into one partial per block; one block
// of the second kernel adds the partials in a fixed order. The same bits run
// to run.
#include "forms.cuh"
#include "tiles.cuh"

#include "torch_ext/formula.h"
#include "torch_ext/learnable.h"
#include "torch_ext/torch_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace torch_ext {
namespace cuda_learnable {
namespace {

using cuda_tiles::bits_t;
using cuda_tiles::kThreads;
using cuda_tiles::kVecs;
using cuda_tiles::Tile;
using formula::compute_t;

constexpr int64_t kMaxBlocks = 1024;  // partial sums of the first reduction pass

// Every thread of the block: the form of this call, from the max_value
// tensor, in shared memory.
template <typename Form, typename T>
__device__ __forceinline__ void build_shared_form(Form& form, const T* m_ptr, int levels) {
  cuda_forms::build_form(form, learnable::effective_max_value<T>(*m_ptr), levels);
  __syncthreads();
}

// y, and with kMasks the two packed masks (row 0: 0 < x < m, row 1: x >= m,
// `bytes` apart).
template <typename scalar_t, bool kMasks, typename Form>
__global__ void __launch_bounds__(kThreads, cuda_tiles::kMinBlocks) forward_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, uint8_t* __restrict__ masks, int64_t numel,
    int64_t bytes, bool aligned, const compute_t<scalar_t>* __restrict__ m_ptr, int levels) {
  using T = compute_t<scalar_t>;
  __shared__ Form form;
  build_shared_form(form, m_ptr, levels);
  cuda_tiles::for_each_tile<scalar_t>(numel, aligned, [&](int64_t t, auto full) {
    constexpr bool kFull = decltype(full)::value;
    cuda_forms::quantize_tile<kFull>(form, x, y, t, numel, [&](int k, const auto& xv) {
      if (kMasks) {
        const T m = form.max_value();
        const uint32_t pass = cuda_tiles::bits_where(xv, [m](T v) { return formula::passes_gradient(v, m); });
        const uint32_t above = cuda_tiles::bits_where(xv, [m](T v) { return v >= m; });
        cuda_tiles::store_mask_bits<kFull, scalar_t>(masks, t, k, numel, pass);
        cuda_tiles::store_mask_bits<kFull, scalar_t>(masks + bytes, t, k, numel, above);
      }
    });
  });
}

// Shared-memory tree reduction of two doubles a thread, in a fixed order.
__device__ __forceinline__ void block_reduce(double* s_in, double* s_above, double in_sum, double above_sum) {
  s_in[threadIdx.x] = in_sum;
  s_above[threadIdx.x] = above_sum;
  __syncthreads();
  for (int width = blockDim.x / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      s_in[threadIdx.x] = s_in[threadIdx.x] + s_in[threadIdx.x + width];
      s_above[threadIdx.x] = s_above[threadIdx.x] + s_above[threadIdx.x + width];
    }
    __syncthreads();
  }
}

// PACT's first pass: grad_x from the pass mask, and one partial sum a block
// of grad_y where x >= m.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, cuda_tiles::kMinBlocks) backward_kernel(
    const scalar_t* __restrict__ grad_y, scalar_t* __restrict__ grad_x, const uint8_t* __restrict__ masks,
    int64_t numel, int64_t bytes, bool aligned, double* __restrict__ partials) {
  using T = compute_t<scalar_t>;
  using B = bits_t<scalar_t>;
  using Tl = Tile<scalar_t>;
  using S = storage::Storage<scalar_t>;
  __shared__ double s_in[kThreads];
  __shared__ double s_above[kThreads];
  double above_sum = 0.0;
  cuda_tiles::for_each_tile<scalar_t>(numel, aligned, [&](int64_t t, auto full) {
    constexpr bool kFull = decltype(full)::value;
    uint32_t pass[kVecs];
    uint32_t above[kVecs];
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      pass[k] = cuda_tiles::load_mask_bits<kFull, scalar_t>(masks, t, k, numel);
      above[k] = cuda_tiles::load_mask_bits<kFull, scalar_t>(masks + bytes, t, k, numel);
    }
    B g[Tl::kThreadElems];
    cuda_tiles::load_tile<kFull>(grad_y, t, numel, g);
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
#pragma unroll
      for (int j = 0; j < Tl::kVecElems; ++j) {
        B& gb = g[k * Tl::kVecElems + j];
        if ((above[k] >> j) & 1u) {
          above_sum += static_cast<double>(static_cast<T>(S::load(gb)));
        }
        gb &= B(0) - static_cast<B>((pass[k] >> j) & 1u);
      }
    }
    cuda_tiles::store_tile<kFull>(grad_x, t, numel, g);
  });
  block_reduce(s_in, s_above, 0.0, above_sum);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = s_in[0];
    partials[2 * blockIdx.x + 1] = s_above[0];
  }
}

// LSQ's first pass, from x itself: grad_x = grad_y where 0 < x < m, and one
// partial sum a block of grad_y * (y - x) there and of grad_y where x >= m,
// y from the form of the forward.
template <typename scalar_t, typename Form>
__global__ void __launch_bounds__(kThreads, cuda_tiles::kMinBlocksTwoTiles) lsq_backward_kernel(
    const scalar_t* __restrict__ grad_y, scalar_t* __restrict__ grad_x, const scalar_t* __restrict__ x,
    int64_t numel, bool aligned, const compute_t<scalar_t>* __restrict__ m_ptr, int levels,
    double* __restrict__ partials) {
  using T = compute_t<scalar_t>;
  using B = bits_t<scalar_t>;
  using Tl = Tile<scalar_t>;
  using S = storage::Storage<scalar_t>;
  __shared__ Form form;
  __shared__ double s_in[kThreads];
  __shared__ double s_above[kThreads];
  build_shared_form(form, m_ptr, levels);
  double in_sum = 0.0;
  double above_sum = 0.0;
  cuda_tiles::for_each_tile<scalar_t>(numel, aligned, [&](int64_t t, auto full) {
    constexpr bool kFull = decltype(full)::value;
    B xb[Tl::kThreadElems];
    B g[Tl::kThreadElems];
    cuda_tiles::load_tile<kFull>(x, t, numel, xb);
    cuda_tiles::load_tile<kFull>(grad_y, t, numel, g);
    const T m = form.max_value();
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      T xv[Tl::kVecElems];
      B yq[Tl::kThreadElems];  // only vector k is written and read
      cuda_forms::quantize_vector<Tl::kVecElems>(form, xb, yq, k, xv);
#pragma unroll
      for (int j = 0; j < Tl::kVecElems; ++j) {
        B& gb = g[k * Tl::kVecElems + j];
        const double gd = static_cast<double>(static_cast<T>(S::load(gb)));
        const bool pass = formula::passes_gradient(xv[j], m);
        if (pass) {
          in_sum += gd * (static_cast<double>(static_cast<T>(S::load(yq[k * Tl::kVecElems + j]))) -
                          static_cast<double>(xv[j]));
        }
        if (xv[j] >= m) {
          above_sum += gd;
        }
        gb &= B(0) - static_cast<B>(pass);
      }
    }
    cuda_tiles::store_tile<kFull>(grad_x, t, numel, g);
  });
  block_reduce(s_in, s_above, in_sum, above_sum);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = s_in[0];
    partials[2 * blockIdx.x + 1] = s_above[0];
  }
}

// Second pass: one block adds the partials in a fixed order and writes
// grad_max_value = (in / m + above) * scale, as a double.
template <typename T>
__global__ void finish_kernel(
    const double* __restrict__ partials, int64_t count, const T* __restrict__ m_ptr, bool lsq, double scale,
    double* __restrict__ out) {
  __shared__ double s_in[kThreads];
  __shared__ double s_above[kThreads];
  double in_sum = 0.0;
  double above_sum = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    in_sum += partials[2 * i];
    above_sum += partials[2 * i + 1];
  }
  block_reduce(s_in, s_above, in_sum, above_sum);
  if (threadIdx.x == 0) {
    const double m = static_cast<double>(learnable::effective_max_value<T>(*m_ptr));
    const double total = lsq ? __dadd_rn(__ddiv_rn(s_in[0], m), s_above[0]) : s_above[0];
    *out = __dmul_rn(total, scale);
  }
}

int levels_of(int64_t bit) {
  return bit == 32 ? 1 : static_cast<int>((int64_t{1} << bit) - 1);
}

at::Tensor m_as_compute_type(const at::Tensor& max_value, at::ScalarType x_dtype) {
  return max_value.to(x_dtype == at::kDouble ? at::kDouble : at::kFloat);  // a device copy at most
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.is_cuda(), "linear_mid_tread_half_quantize_learnable: ", name, " must be a CUDA tensor, got ", t.device());
}

template <bool kMasks>
void launch_forward(const at::Tensor& xc, at::Tensor& y, uint8_t* masks, const at::Tensor& max_value, int64_t bit) {
  const int64_t numel = xc.numel();
  if (numel == 0) {
    return;
  }
  const at::Tensor mt = m_as_compute_type(max_value, xc.scalar_type());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "learnable_forward_cuda", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* x = xc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const bool aligned = cuda_tiles::aligned16(x) && cuda_tiles::aligned16(yp);
    const int64_t grid = cuda_tiles::grid_for<scalar_t>(numel, xc.device().index());
    cuda_forms::with_form<scalar_t>(bit, [&](auto* form) {
      using Form = std::remove_pointer_t<decltype(form)>;
      forward_kernel<scalar_t, kMasks, Form><<<grid, kThreads, 0, stream>>>(
          x, yp, masks, numel, mask_numel(numel), aligned, mt.const_data_ptr<T>(), levels_of(bit));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor learnable_cuda(const at::Tensor& x, const at::Tensor& max_value, int64_t bit, c10::string_view mode,
                          bool /*scale_grad*/) {
  check_learnable_arguments(x, max_value, bit, std::string(mode));
  check_cuda(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  launch_forward<false>(xc, y, nullptr, max_value, bit);
  return y;
}

std::tuple<at::Tensor, at::Tensor> learnable_forward_cuda(const at::Tensor& x, const at::Tensor& max_value, int64_t bit) {
  check_learnable_arguments(x, max_value, bit, "pact");
  check_cuda(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor masks = at::empty({2, mask_numel(x.numel())}, x.options().dtype(at::kByte));
  launch_forward<true>(xc, y, masks.data_ptr<uint8_t>(), max_value, bit);
  return {y, masks};
}

std::tuple<at::Tensor, at::Tensor> learnable_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& max_value, int64_t bit,
    c10::string_view mode_view, bool scale_grad) {
  const std::string mode(mode_view);
  check_learnable_backward_arguments(grad_y, saved, max_value, bit, mode);
  check_cuda(grad_y, "grad_y");
  c10::cuda::CUDAGuard guard(grad_y.device());
  const at::Tensor g = grad_y.contiguous();
  const at::Tensor s = saved.contiguous();
  const int64_t numel = g.numel();
  const bool lsq = mode == "lsq";
  at::Tensor grad_x = at::empty(g.sizes(), g.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor out = at::empty({}, g.options().dtype(at::kDouble));
  const at::Tensor mt = m_as_compute_type(max_value, g.scalar_type());
  const double scale = scale_grad && numel > 0
                           ? 1.0 / std::sqrt(static_cast<double>(numel) * (std::ldexp(1.0, static_cast<int>(bit)) - 1.0))
                           : 1.0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "learnable_backward_cuda", [&] {
    using T = compute_t<scalar_t>;
    const int64_t blocks = cuda_tiles::grid_for<scalar_t>(numel, g.device().index(), kMaxBlocks);
    at::Tensor partials = at::empty({2 * blocks}, g.options().dtype(at::kDouble));
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    const bool aligned = cuda_tiles::aligned16(gp) && cuda_tiles::aligned16(gx);
    if (lsq) {
      const scalar_t* xp = static_cast<const scalar_t*>(s.const_data_ptr());
      cuda_forms::with_form<scalar_t>(bit, [&](auto* form) {
        using Form = std::remove_pointer_t<decltype(form)>;
        lsq_backward_kernel<scalar_t, Form><<<blocks, kThreads, 0, stream>>>(
            gp, gx, xp, numel, aligned && cuda_tiles::aligned16(xp), mt.const_data_ptr<T>(), levels_of(bit),
            partials.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          gp, gx, static_cast<const uint8_t*>(s.const_data_ptr()), numel, mask_numel(numel), aligned,
          partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finish_kernel<T><<<1, kThreads, 0, stream>>>(
        partials.const_data_ptr<double>(), blocks, mt.const_data_ptr<T>(), lsq, scale, out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, out.to(max_value.scalar_type())};
}

}  // namespace
}  // namespace cuda_learnable
}  // namespace torch_ext

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("linear_mid_tread_half_quantize_learnable", &torch_ext::cuda_learnable::learnable_cuda);
  m.impl("linear_mid_tread_half_quantize_learnable_forward", &torch_ext::cuda_learnable::learnable_forward_cuda);
  m.impl("linear_mid_tread_half_quantize_learnable_backward", &torch_ext::cuda_learnable::learnable_backward_cuda);
}
