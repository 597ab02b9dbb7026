// CUDA kernels of the linear mid-tread half quantizer.
//
// Each thread handles groups of 8 consecutive elements: one byte of the packed
// mask, and 16 bytes (float16/bfloat16), 32 bytes (float32) or 64 bytes
// (float64) of data, moved with 128-bit loads and stores when the pointers are
// 16-byte aligned. Indices are 64-bit and the grid strides, so tensors of more
// than 2^31 elements are covered. The math is formula.h, shared with the CPU;
// its device path uses the _rn intrinsics, and this file is also compiled with
// -fmad=false, so the results are bit-identical to the CPU kernels.
#include "torch_ext/formula.h"
#include "torch_ext/layouts.h"
#include "torch_ext/torch_ext.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

namespace torch_ext {
namespace cuda {
namespace {

using formula::compute_t;
using formula::Params;

constexpr int kGroup = 8;  // elements a thread step: one mask byte
constexpr int kThreads = 256;

template <typename scalar_t>
using bits_t = std::conditional_t<
    sizeof(scalar_t) == 2, uint16_t,
    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;

// 8 elements, as the bits of each.
template <typename scalar_t>
struct alignas(16) Group {
  bits_t<scalar_t> v[kGroup];
};

// 16, 32 or 64 bytes between global memory and a Group, punned with memcpy
// (the defined way; never a uint4 lvalue over the array): with the pointer
// known to be 16-byte aligned, nvcc emits 128-bit loads and stores
// (ld.global.v4.u32 / v2.u64). __builtin_assume_aligned takes a void
// pointer here: given a typed one, nvcc 13.0's front end emits invalid IR.
template <typename scalar_t>
__device__ __forceinline__ void load_group(const scalar_t* src, Group<scalar_t>& g) {
  memcpy(g.v, __builtin_assume_aligned(static_cast<const void*>(src), 16), sizeof(g.v));
}

template <typename scalar_t>
__device__ __forceinline__ void store_group(scalar_t* dst, const Group<scalar_t>& g) {
  memcpy(__builtin_assume_aligned(static_cast<void*>(dst), 16), g.v, sizeof(g.v));
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_bits(bits_t<scalar_t> b) {
  scalar_t s;
  memcpy(&s, &b, sizeof(s));
  return s;
}

template <typename scalar_t>
__device__ __forceinline__ bits_t<scalar_t> to_bits(scalar_t s) {
  bits_t<scalar_t> b;
  memcpy(&b, &s, sizeof(b));
  return b;
}

// x and y may be the same memory (in place): not __restrict__.
template <typename scalar_t, bool kWriteMask>
__global__ void forward_kernel(
    const scalar_t* x, scalar_t* y, uint8_t* mask, int64_t numel, Params<compute_t<scalar_t>> p, bool vectorized) {
  using T = compute_t<scalar_t>;
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t base = g * kGroup;
    const bool full = base + kGroup <= numel;
    Group<scalar_t> in;
    if (vectorized && full) {
      load_group(x + base, in);
    } else {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        in.v[j] = base + j < numel ? to_bits(x[base + j]) : bits_t<scalar_t>(0);
      }
    }
    Group<scalar_t> out;
    uint32_t bits = 0;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const T xv = static_cast<T>(from_bits<scalar_t>(in.v[j]));
      if (kWriteMask) {
        bits |= static_cast<uint32_t>(formula::passes_gradient(xv, p.max_value)) << j;
      }
      out.v[j] = formula::canonical_nan<scalar_t>(to_bits(static_cast<scalar_t>(formula::quantize(xv, p))));
    }
    if (vectorized && full) {
      store_group(y + base, out);
    } else {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (base + j < numel) {
          y[base + j] = from_bits<scalar_t>(out.v[j]);
        }
      }
    }
    if (kWriteMask) {
      mask[g] = static_cast<uint8_t>(bits);
    }
  }
}

template <typename scalar_t>
__global__ void backward_kernel(
    const scalar_t* grad_y, scalar_t* grad_x, const uint8_t* __restrict__ mask, int64_t numel, bool vectorized) {
  using B = bits_t<scalar_t>;
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t base = g * kGroup;
    const bool full = base + kGroup <= numel;
    const uint32_t bits = mask[g];
    Group<scalar_t> v;
    if (vectorized && full) {
      load_group(grad_y + base, v);
    } else {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        v.v[j] = base + j < numel ? to_bits(grad_y[base + j]) : B(0);
      }
    }
    // Select raw bits: exactly +0 where the mask is clear, even for inf/NaN.
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      v.v[j] &= B(0) - static_cast<B>((bits >> j) & 1u);
    }
    if (vectorized && full) {
      store_group(grad_x + base, v);
    } else {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (base + j < numel) {
          grad_x[base + j] = from_bits<scalar_t>(v.v[j]);
        }
      }
    }
  }
}

bool aligned16(const void* a, const void* b) {
  return reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

// Blocks that fit on the device at once (multiprocessors x blocks a
// multiprocessor holds), asked of the runtime once per device and cached:
// not three runtime calls on every launch. Only the runtime's attribute
// queries: ATen/cuda/CUDAContext.h would pull in cuBLAS and cuSPARSE headers
// that a minimal toolkit does not have.
int64_t resident_blocks(c10::DeviceIndex device) {
  static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> once;
  static std::array<int64_t, C10_COMPILE_TIME_MAX_GPUS> blocks;
  TORCH_CHECK(
      device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS,
      "linear_mid_tread_half_quantize: CUDA device index ", static_cast<int>(device), " out of range");
  // call_once: one thread fills the entry, the others wait for it; a throw
  // leaves it unfilled for the next call.
  std::call_once(once[device], [device] {
    int sms = 0;
    int threads_per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
    blocks[device] = static_cast<int64_t>(sms) * std::max(1, threads_per_sm / kThreads);
  });
  return blocks[device];
}

// The grid of a launch over numel elements on `device`: one thread an
// 8-element group, capped at what is resident (the kernels stride the grid).
int64_t grid_for(int64_t numel, c10::DeviceIndex device) {
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  return std::max<int64_t>(1, std::min<int64_t>((groups + kThreads - 1) / kThreads, resident_blocks(device)));
}

struct ForwardKernel {
  int64_t bit;
  double max_value;
  void operator()(const at::Tensor& src, const at::Tensor& dst, uint8_t* mask) const {
    const int64_t numel = src.numel();
    const int64_t grid = grid_for(numel, src.device().index());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "linear_mid_tread_half_quantize_cuda", [&] {
      const auto p = formula::make_params<compute_t<scalar_t>>(bit, max_value);
      const scalar_t* x = static_cast<const scalar_t*>(src.const_data_ptr());
      scalar_t* y = static_cast<scalar_t*>(dst.data_ptr());
      const bool vectorized = aligned16(x, y);
      if (mask != nullptr) {
        forward_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(x, y, mask, numel, p, vectorized);
      } else {
        forward_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(x, y, nullptr, numel, p, vectorized);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    const int64_t grid = grid_for(numel, g.device().index());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "linear_mid_tread_half_quantize_backward_cuda", [&] {
      const scalar_t* src = static_cast<const scalar_t*>(g.const_data_ptr());
      scalar_t* dst = static_cast<scalar_t*>(out.data_ptr());
      backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(src, dst, m, numel, aligned16(src, dst));
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
