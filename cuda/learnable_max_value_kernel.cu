// CUDA kernels of the learnable-max_value operators (csrc/torch_ext/learnable.h).
//
// m is read by the kernels from the 0-dim max_value tensor (converted to the
// compute type T of x by a device-side copy when its dtype differs) and
// clamped there by learnable::effective_max_value: nothing is read on the
// host, so nothing synchronises. The math is formula.h, as in the fixed
// operator's kernels (this file is also compiled with -fmad=false), so y is
// bit-identical to linear_mid_tread_half_quantize(x, bit, m) on either device.
//
// grad_max_value is summed in two passes with no atomics: each block of the
// first kernel sums its elements (a fixed grid-stride assignment that depends
// on the element count only) in double and reduces them in shared memory in
// a fixed tree order into one partial per block; one block of the second
// kernel adds the partials in a fixed order. The same bits run to run.
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

namespace torch_ext {
namespace cuda_learnable {
namespace {

using formula::compute_t;
using formula::Params;

constexpr int kGroup = 8;  // elements a thread step: one byte of each mask
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;  // partial sums of the first reduction pass

template <typename T>
__device__ __forceinline__ Params<T> device_params(const T* m_ptr, T levels, bool clip_only) {
  Params<T> p;
  p.max_value = learnable::effective_max_value<T>(*m_ptr);
  p.levels = levels;
  p.clip_only = clip_only;
  return p;
}

template <typename scalar_t, bool kMasks>
__global__ void forward_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, uint8_t* __restrict__ masks, int64_t numel,
    int64_t bytes, const compute_t<scalar_t>* __restrict__ m_ptr, compute_t<scalar_t> levels, bool clip_only) {
  using T = compute_t<scalar_t>;
  using B = typename formula::NaNBits<scalar_t>::type;
  const Params<T> p = device_params(m_ptr, levels, clip_only);
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t base = g * kGroup;
    uint32_t pass = 0;
    uint32_t above = 0;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (base + j < numel) {
        const T xv = static_cast<T>(x[base + j]);
        if (kMasks) {
          pass |= static_cast<uint32_t>(formula::passes_gradient(xv, p.max_value)) << j;
          above |= static_cast<uint32_t>(xv >= p.max_value) << j;
        }
        const scalar_t r = static_cast<scalar_t>(formula::quantize(xv, p));
        B bits;
        memcpy(&bits, &r, sizeof(B));
        bits = formula::canonical_nan<scalar_t>(bits);
        memcpy(y + base + j, &bits, sizeof(B));
      }
    }
    if (kMasks) {
      masks[g] = static_cast<uint8_t>(pass);
      masks[bytes + g] = static_cast<uint8_t>(above);
    }
  }
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

// First pass: grad_x, and one (in, above) partial sum per block.
// kLsq: `saved` is x (scalar_t); otherwise the two masks.
template <typename scalar_t, bool kLsq>
__global__ void backward_kernel(
    const scalar_t* __restrict__ grad_y, scalar_t* __restrict__ grad_x, const void* __restrict__ saved,
    int64_t numel, int64_t bytes, const compute_t<scalar_t>* __restrict__ m_ptr, compute_t<scalar_t> levels,
    bool clip_only, double* __restrict__ partials) {
  using T = compute_t<scalar_t>;
  __shared__ double s_in[kThreads];
  __shared__ double s_above[kThreads];
  const Params<T> p = device_params(m_ptr, levels, clip_only);
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  double in_sum = 0.0;
  double above_sum = 0.0;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t base = g * kGroup;
    uint32_t pass_bits = 0;
    uint32_t above_bits = 0;
    if (!kLsq) {
      const uint8_t* masks = static_cast<const uint8_t*>(saved);
      pass_bits = masks[g];
      above_bits = masks[bytes + g];
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (base + j < numel) {
        const scalar_t gs = grad_y[base + j];
        const double gd = static_cast<double>(static_cast<T>(gs));
        bool pass;
        bool above;
        if (kLsq) {
          const scalar_t xs = static_cast<const scalar_t*>(saved)[base + j];
          const T xv = static_cast<T>(xs);
          pass = formula::passes_gradient(xv, p.max_value);
          above = xv >= p.max_value;
          if (pass) {
            const scalar_t yq = static_cast<scalar_t>(formula::quantize(xv, p));
            in_sum += gd * (static_cast<double>(static_cast<T>(yq)) - static_cast<double>(xv));
          }
        } else {
          pass = (pass_bits >> j) & 1u;
          above = (above_bits >> j) & 1u;
        }
        if (above) {
          above_sum += gd;
        }
        grad_x[base + j] = pass ? gs : static_cast<scalar_t>(0);
      }
    }
  }
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

int64_t grid_for(int64_t numel) {
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (groups + kThreads - 1) / kThreads));
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
    const auto p = formula::make_params<T>(bit, 1.0);
    forward_kernel<scalar_t, kMasks><<<grid_for(numel), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), masks, numel, mask_numel(numel),
        mt.const_data_ptr<T>(), p.levels, p.clip_only);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const int64_t blocks = grid_for(numel);
  at::Tensor partials = at::empty({2 * blocks}, g.options().dtype(at::kDouble));
  const at::Tensor mt = m_as_compute_type(max_value, g.scalar_type());
  const double scale = scale_grad && numel > 0
                           ? 1.0 / std::sqrt(static_cast<double>(numel) * (std::ldexp(1.0, static_cast<int>(bit)) - 1.0))
                           : 1.0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "learnable_backward_cuda", [&] {
    using T = compute_t<scalar_t>;
    const auto p = formula::make_params<T>(bit, 1.0);
    if (lsq) {
      backward_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), s.const_data_ptr(), numel, mask_numel(numel),
          mt.const_data_ptr<T>(), p.levels, p.clip_only, partials.data_ptr<double>());
    } else {
      backward_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), s.const_data_ptr(), numel, mask_numel(numel),
          mt.const_data_ptr<T>(), p.levels, p.clip_only, partials.data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
