// CPU kernels of the linear mid-tread half quantizer.
//
// The loops are plain C++ over one contiguous span, written so that GCC and
// Clang vectorize them (no calls, selects instead of branches, the mask
// packed from a byte array). Each loop is compiled twice: for the baseline
// x86-64 ISA and for AVX2, picked at run time. The baseline ISA has no vector
// floor (it needs SSE4.1's roundps), so without the AVX2 copy the forward
// would run one element at a time. AVX2 here does not enable FMA, and the
// files are compiled with -ffp-contract=off anyway: each step of SPEC.md stays
// one rounded operation, so both copies give bit-identical results.
#include "torch_ext/formula.h"
#include "torch_ext/layouts.h"
#include "torch_ext/torch_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

namespace torch_ext {
namespace cpu {
namespace {

using formula::compute_t;
using formula::Params;

// Elements a block: 8 mask bytes. Blocks are the unit of work of a thread, so
// no two threads ever write to the same mask byte.
constexpr int64_t kBlock = 64;
// At least this many elements a thread (about 64 KiB of float32 in and out).
constexpr int64_t kGrainElements = 16384;

// An unsigned integer of the same width as scalar_t: the backward selects raw
// bits, so -0.0, NaN payloads and infinities of grad_y pass unchanged.
template <typename scalar_t>
using bits_t = std::conditional_t<
    sizeof(scalar_t) == 2, uint16_t,
    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;

#define TORCH_EXT_DEFINE_LOOPS(TARGET_ATTRIBUTE)                                                   \
  template <typename scalar_t, bool kWriteMask>                                                   \
  TARGET_ATTRIBUTE void forward_block(                                                              \
      const scalar_t* x, scalar_t* y, uint8_t* mask, int64_t count, Params<compute_t<scalar_t>> p) { \
    using T = compute_t<scalar_t>;                                                                 \
    if (kWriteMask) {                                                                              \
      /* The mask first: in place, y overwrites x. */                                              \
      uint8_t flags[kBlock];                                                                       \
      for (int64_t j = 0; j < count; ++j) {                                                        \
        flags[j] = formula::passes_gradient(static_cast<T>(x[j]), p.max_value) ? 1 : 0;           \
      }                                                                                            \
      for (int64_t j = count; j < kBlock; ++j) {                                                   \
        flags[j] = 0;                                                                              \
      }                                                                                            \
      const int64_t bytes = mask_numel(count);                                                     \
      for (int64_t b = 0; b < bytes; ++b) {                                                        \
        const uint8_t* f = flags + 8 * b;                                                          \
        mask[b] = static_cast<uint8_t>(                                                            \
            f[0] | (f[1] << 1) | (f[2] << 2) | (f[3] << 3) | (f[4] << 4) | (f[5] << 5) |           \
            (f[6] << 6) | (f[7] << 7));                                                            \
      }                                                                                            \
    }                                                                                              \
    if (p.clip_only) {                                                                             \
      for (int64_t j = 0; j < count; ++j) {                                                        \
        y[j] = static_cast<scalar_t>(formula::clip(static_cast<T>(x[j]), p.max_value));            \
      }                                                                                            \
    } else {                                                                                       \
      for (int64_t j = 0; j < count; ++j) {                                                        \
        y[j] = static_cast<scalar_t>(formula::quantize(static_cast<T>(x[j]), p));                  \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
                                                                                                   \
  template <typename scalar_t>                                                                     \
  TARGET_ATTRIBUTE void backward_block(                                                             \
      const scalar_t* grad_y, scalar_t* grad_x, const uint8_t* mask, int64_t count) {              \
    using B = bits_t<scalar_t>;                                                                    \
    const B* g = reinterpret_cast<const B*>(grad_y);                                               \
    B* out = reinterpret_cast<B*>(grad_x);                                                         \
    for (int64_t j = 0; j < count; ++j) {                                                          \
      const B keep = static_cast<B>(0) - static_cast<B>((mask[j >> 3] >> (j & 7)) & 1);            \
      out[j] = g[j] & keep;                                                                        \
    }                                                                                              \
  }

namespace baseline {
TORCH_EXT_DEFINE_LOOPS()
}  // namespace baseline

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TORCH_EXT_HAVE_AVX2_LOOPS 1
namespace avx2 {
TORCH_EXT_DEFINE_LOOPS(__attribute__((target("avx2"))))
}  // namespace avx2

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

#undef TORCH_EXT_DEFINE_LOOPS

template <typename scalar_t, bool kWriteMask>
void forward_span(const scalar_t* x, scalar_t* y, uint8_t* mask, int64_t numel, Params<compute_t<scalar_t>> p) {
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainElements / kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t offset = block * kBlock;
      const int64_t count = std::min(kBlock, numel - offset);
      uint8_t* block_mask = kWriteMask ? mask + offset / 8 : nullptr;
#ifdef TORCH_EXT_HAVE_AVX2_LOOPS
      if (cpu_has_avx2()) {
        avx2::forward_block<scalar_t, kWriteMask>(x + offset, y + offset, block_mask, count, p);
        continue;
      }
#endif
      baseline::forward_block<scalar_t, kWriteMask>(x + offset, y + offset, block_mask, count, p);
    }
  });
}

template <typename scalar_t>
void backward_span(const scalar_t* grad_y, scalar_t* grad_x, const uint8_t* mask, int64_t numel) {
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainElements / kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t offset = block * kBlock;
      const int64_t count = std::min(kBlock, numel - offset);
#ifdef TORCH_EXT_HAVE_AVX2_LOOPS
      if (cpu_has_avx2()) {
        avx2::backward_block<scalar_t>(grad_y + offset, grad_x + offset, mask + offset / 8, count);
        continue;
      }
#endif
      baseline::backward_block<scalar_t>(grad_y + offset, grad_x + offset, mask + offset / 8, count);
    }
  });
}

// The flat kernel of layouts.h: src and dst share one dense layout.
struct ForwardKernel {
  int64_t bit;
  double max_value;
  void operator()(const at::Tensor& src, const at::Tensor& dst, uint8_t* mask) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "linear_mid_tread_half_quantize_cpu", [&] {
      const auto p = formula::make_params<compute_t<scalar_t>>(bit, max_value);
      // data_ptr of src may equal that of dst (in place): read through a
      // const pointer of the same type, never restrict-qualified.
      const scalar_t* x = static_cast<const scalar_t*>(src.const_data_ptr());
      scalar_t* y = static_cast<scalar_t*>(dst.data_ptr());
      if (mask != nullptr) {
        forward_span<scalar_t, true>(x, y, mask, src.numel(), p);
      } else {
        forward_span<scalar_t, false>(x, y, nullptr, src.numel(), p);
      }
    });
  }
};

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "linear_mid_tread_half_quantize: ", name, " must be a CPU tensor, got ", t.device());
}

at::Tensor quantize_cpu(const at::Tensor& x, int64_t bit, double max_value) {
  check_quantize_arguments(x.scalar_type(), bit, max_value);
  check_cpu(x, "x");
  return layouts::quantize(x, ForwardKernel{bit, max_value});
}

void quantize_cpu_(at::Tensor& x, int64_t bit, double max_value) {
  check_quantize_arguments(x.scalar_type(), bit, max_value);
  check_cpu(x, "x");
  layouts::quantize_(x, ForwardKernel{bit, max_value});
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, int64_t bit, double max_value) {
  check_quantize_arguments(x.scalar_type(), bit, max_value);
  check_cpu(x, "x");
  return layouts::forward(x, ForwardKernel{bit, max_value});
}

at::Tensor forward_cpu_(at::Tensor& x, int64_t bit, double max_value) {
  check_quantize_arguments(x.scalar_type(), bit, max_value);
  check_cpu(x, "x");
  return layouts::forward_(x, ForwardKernel{bit, max_value});
}

at::Tensor backward_cpu(const at::Tensor& grad_y, const at::Tensor& mask) {
  check_backward_arguments(grad_y, mask);
  check_cpu(grad_y, "grad_y");
  return layouts::backward(grad_y, mask, [](const at::Tensor& g, const at::Tensor& out, const uint8_t* m) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "linear_mid_tread_half_quantize_backward_cpu", [&] {
      backward_span<scalar_t>(
          static_cast<const scalar_t*>(g.const_data_ptr()), static_cast<scalar_t*>(out.data_ptr()), m, g.numel());
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace torch_ext

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("linear_mid_tread_half_quantize", &torch_ext::cpu::quantize_cpu);
  m.impl("linear_mid_tread_half_quantize_", &torch_ext::cpu::quantize_cpu_);
  m.impl("linear_mid_tread_half_quantize_forward", &torch_ext::cpu::forward_cpu);
  m.impl("linear_mid_tread_half_quantize_forward_", &torch_ext::cpu::forward_cpu_);
  m.impl("linear_mid_tread_half_quantize_backward", &torch_ext::cpu::backward_cpu);
}
