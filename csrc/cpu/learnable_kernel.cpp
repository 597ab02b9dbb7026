// CPU kernels of the learnable-max_value operators (csrc/torch_ext/learnable.h;
// schemas, checks and autograd in csrc/ops/learnable.cpp).
//
// The forward is the quantizer of formula.h, step for step, with m read from
// the 0-dim max_value tensor and clamped by learnable::effective_max_value;
// so y is bit-identical to linear_mid_tread_half_quantize(x, bit, m).
//
// The backward writes grad_x (grad_y where 0 < x < m, exactly 0 elsewhere)
// and sums grad_max_value in the same pass. The sum is deterministic for any
// thread count: the elements are cut into blocks of kBlock, fixed by the
// element count alone; each block's sum is taken in double, in 8 lanes
// (element i into lane i % 8) added in a fixed order, and the per-block sums
// are then added one after another in block order on one thread.
#include "torch_ext/cpu_isa.h"
#include "torch_ext/formula.h"
#include "torch_ext/mask_bits.h"
#include "torch_ext/learnable.h"
#include "torch_ext/torch_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace torch_ext {
namespace cpu_learnable {
namespace {

using formula::compute_t;

constexpr int64_t kChunk = 256;           // elements a chunk: 32 mask bytes
constexpr int64_t kBlock = 16 * kChunk;   // elements a partial sum
constexpr int64_t kLanes = 8;
constexpr int64_t kGrainBlocks = 8;       // 32768 elements a thread at least

using mask_bits::bits_t;
using mask_bits::kUnpack;
using mask_bits::pack_flags;

template <typename T>
struct Consts {
  T m;          // the effective m
  T n;          // levels (unused when clip_only)
  bool clip_only;
};

template <typename scalar_t>
C10_ALWAYS_INLINE void store_canonical(scalar_t* y, scalar_t r) {
  using B = bits_t<scalar_t>;
  B bits;
  std::memcpy(&bits, &r, sizeof(B));
  bits = formula::canonical_nan<scalar_t>(bits);
  std::memcpy(y, &bits, sizeof(B));
}

// One chunk of the forward: y, and with kMasks the two masks.
template <typename scalar_t, bool kMasks>
C10_ALWAYS_INLINE void forward_chunk(
    const scalar_t* x, scalar_t* y, uint8_t* pass, uint8_t* above, int64_t count, Consts<compute_t<scalar_t>> c) {
  using T = compute_t<scalar_t>;
  const T m = c.m;
  if (kMasks) {
    alignas(64) uint8_t fp[kChunk];
    alignas(64) uint8_t fa[kChunk];
    for (int64_t j = 0; j < count; ++j) {
      const T xv = static_cast<T>(x[j]);
      fp[j] = formula::passes_gradient(xv, m);
      fa[j] = xv >= m;
    }
    const int64_t bytes = mask_numel(count);
    for (int64_t j = count; j < 8 * bytes; ++j) {
      fp[j] = 0;
      fa[j] = 0;
    }
    for (int64_t b = 0; b < bytes; ++b) {
      pass[b] = pack_flags(fp + 8 * b);
      above[b] = pack_flags(fa + 8 * b);
    }
  }
  if (c.clip_only) {
    for (int64_t j = 0; j < count; ++j) {
      store_canonical(y + j, static_cast<scalar_t>(formula::clip(static_cast<T>(x[j]), m)));
    }
  } else {
    const T n = c.n;
    for (int64_t j = 0; j < count; ++j) {
      store_canonical(y + j, static_cast<scalar_t>(formula::quantize_levels(static_cast<T>(x[j]), m, n)));
    }
  }
}

// grad_x = grad_y through the bits where flags[j], exactly +0 elsewhere.
template <typename scalar_t>
C10_ALWAYS_INLINE void mask_grad(const scalar_t* grad_y, scalar_t* grad_x, const uint8_t* flags, int64_t count) {
  using B = bits_t<scalar_t>;
  for (int64_t j = 0; j < count; ++j) {
    B g;
    std::memcpy(&g, grad_y + j, sizeof(B));
    g &= B(0) - static_cast<B>(flags[j]);
    std::memcpy(grad_x + j, &g, sizeof(B));
  }
}

// acc[k] += v[i + k] over a chunk of kChunk values (zeros past the count).
C10_ALWAYS_INLINE void accumulate(double* acc, const double* v) {
  for (int64_t i = 0; i < kChunk; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      acc[k] += v[i + k];
    }
  }
}

C10_ALWAYS_INLINE double lanes_sum(const double* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// One block of the PACT backward: returns the block's sum of grad_y where x >= m.
template <typename scalar_t>
C10_ALWAYS_INLINE double pact_backward_block(
    const scalar_t* grad_y, scalar_t* grad_x, const uint8_t* pass, const uint8_t* above, int64_t count) {
  using T = compute_t<scalar_t>;
  alignas(64) double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  alignas(64) uint8_t fp[kChunk];
  alignas(64) uint8_t fa[kChunk];
  alignas(64) double v[kChunk];
  for (int64_t off = 0; off < count; off += kChunk) {
    const int64_t n = std::min(kChunk, count - off);
    const int64_t bytes = mask_numel(n);
    for (int64_t b = 0; b < bytes; ++b) {
      std::memcpy(fp + 8 * b, &kUnpack.flags[pass[off / 8 + b]], 8);
      std::memcpy(fa + 8 * b, &kUnpack.flags[above[off / 8 + b]], 8);
    }
    mask_grad(grad_y + off, grad_x + off, fp, n);
    for (int64_t j = 0; j < n; ++j) {
      const double g = static_cast<double>(static_cast<T>(grad_y[off + j]));
      v[j] = fa[j] ? g : 0.0;
    }
    for (int64_t j = n; j < kChunk; ++j) {
      v[j] = 0.0;
    }
    accumulate(acc, v);
  }
  return lanes_sum(acc);
}

// One block of the LSQ backward: the block's sums of grad_y * (y - x) where
// 0 < x < m (into in) and of grad_y where x >= m (into out).
template <typename scalar_t>
C10_ALWAYS_INLINE void lsq_backward_block(
    const scalar_t* grad_y, scalar_t* grad_x, const scalar_t* x, int64_t count, Consts<compute_t<scalar_t>> c,
    double* in_sum, double* above_sum) {
  using T = compute_t<scalar_t>;
  const T m = c.m;
  alignas(64) double acc_in[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  alignas(64) double acc_above[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  alignas(64) uint8_t fp[kChunk];
  alignas(64) scalar_t y[kChunk];
  alignas(64) double vi[kChunk];
  alignas(64) double va[kChunk];
  for (int64_t off = 0; off < count; off += kChunk) {
    const int64_t n = std::min(kChunk, count - off);
    const scalar_t* xs = x + off;
    for (int64_t j = 0; j < n; ++j) {
      fp[j] = formula::passes_gradient(static_cast<T>(xs[j]), m);
    }
    mask_grad(grad_y + off, grad_x + off, fp, n);
    if (c.clip_only) {
      for (int64_t j = 0; j < n; ++j) {
        y[j] = static_cast<scalar_t>(formula::clip(static_cast<T>(xs[j]), m));
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        y[j] = static_cast<scalar_t>(formula::quantize_levels(static_cast<T>(xs[j]), m, c.n));
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const T xv = static_cast<T>(xs[j]);
      const double g = static_cast<double>(static_cast<T>(grad_y[off + j]));
      const double d = static_cast<double>(static_cast<T>(y[j])) - static_cast<double>(xv);
      vi[j] = fp[j] ? g * d : 0.0;
      va[j] = xv >= m ? g : 0.0;
    }
    for (int64_t j = n; j < kChunk; ++j) {
      vi[j] = 0.0;
      va[j] = 0.0;
    }
    accumulate(acc_in, vi);
    accumulate(acc_above, va);
  }
  *in_sum = lanes_sum(acc_in);
  *above_sum = lanes_sum(acc_above);
}

// Per-ISA copies, as in the fixed operator's kernels: the baseline x86-64 ISA
// has no vector floor, so an AVX2 copy is picked at run time when available.
struct Baseline {
  template <typename scalar_t, bool kMasks>
  static void forward(const scalar_t* x, scalar_t* y, uint8_t* p, uint8_t* a, int64_t count,
                      Consts<compute_t<scalar_t>> c) {
    forward_chunk<scalar_t, kMasks>(x, y, p, a, count, c);
  }
  template <typename scalar_t>
  static double pact(const scalar_t* g, scalar_t* gx, const uint8_t* p, const uint8_t* a, int64_t count) {
    return pact_backward_block<scalar_t>(g, gx, p, a, count);
  }
  template <typename scalar_t>
  static void lsq(const scalar_t* g, scalar_t* gx, const scalar_t* x, int64_t count, Consts<compute_t<scalar_t>> c,
                  double* in_sum, double* above_sum) {
    lsq_backward_block<scalar_t>(g, gx, x, count, c, in_sum, above_sum);
  }
};

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TORCH_EXT_LEARNABLE_HAVE_AVX2 1
struct Avx2 {
  template <typename scalar_t, bool kMasks>
  __attribute__((target("avx2"))) static void forward(
      const scalar_t* x, scalar_t* y, uint8_t* p, uint8_t* a, int64_t count, Consts<compute_t<scalar_t>> c) {
    forward_chunk<scalar_t, kMasks>(x, y, p, a, count, c);
  }
  template <typename scalar_t>
  __attribute__((target("avx2"))) static double pact(
      const scalar_t* g, scalar_t* gx, const uint8_t* p, const uint8_t* a, int64_t count) {
    return pact_backward_block<scalar_t>(g, gx, p, a, count);
  }
  template <typename scalar_t>
  __attribute__((target("avx2"))) static void lsq(
      const scalar_t* g, scalar_t* gx, const scalar_t* x, int64_t count, Consts<compute_t<scalar_t>> c,
      double* in_sum, double* above_sum) {
    lsq_backward_block<scalar_t>(g, gx, x, count, c, in_sum, above_sum);
  }
};
#endif

template <typename F>
void with_isa(F&& f) {
#ifdef TORCH_EXT_LEARNABLE_HAVE_AVX2
  if (cpu_isa() >= kIsaAvx2) {  // the CPU's, capped by TORCH_EXT_CPU_ISA (cpu_isa.h)
    f(Avx2{});
    return;
  }
#endif
  f(Baseline{});
}

// m as the compute type T of x (the value of max_value rounded once to T),
// then clamped. max_value is a CPU tensor: reading it is no synchronisation.
template <typename T>
T read_max_value(const at::Tensor& max_value) {
  const at::Tensor mt = max_value.to(std::is_same_v<T, double> ? at::kDouble : at::kFloat);
  return learnable::effective_max_value<T>(*mt.const_data_ptr<T>());
}

template <typename T>
Consts<T> make_consts(const at::Tensor& max_value, int64_t bit) {
  const auto p = formula::make_params<T>(bit, 1.0);
  return Consts<T>{read_max_value<T>(max_value), p.levels, p.clip_only};
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.device().is_cpu(), "linear_mid_tread_half_quantize_learnable: ", name, " must be a CPU tensor, got ",
      t.device());
}

template <bool kMasks>
void run_forward(const at::Tensor& xc, const at::Tensor& y, uint8_t* masks, const at::Tensor& max_value, int64_t bit) {
  const int64_t numel = xc.numel();
  const int64_t bytes = mask_numel(numel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "learnable_forward_cpu", [&] {
    using T = compute_t<scalar_t>;
    const auto c = make_consts<T>(max_value, bit);
    const scalar_t* x = xc.const_data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    with_isa([&](auto isa) {
      using Isa = decltype(isa);
      const int64_t chunks = (numel + kChunk - 1) / kChunk;
      at::parallel_for(0, chunks, kGrainBlocks * (kBlock / kChunk), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t off = k * kChunk;
          const int64_t count = std::min(kChunk, numel - off);
          Isa::template forward<scalar_t, kMasks>(
              x + off, out + off, kMasks ? masks + off / 8 : nullptr, kMasks ? masks + bytes + off / 8 : nullptr,
              count, c);
        }
      });
    });
  });
}

at::Tensor learnable_cpu(const at::Tensor& x, const at::Tensor& max_value, int64_t bit, c10::string_view mode,
                         bool /*scale_grad*/) {
  check_learnable_arguments(x, max_value, bit, std::string(mode));
  check_cpu(x, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  run_forward<false>(xc, y, nullptr, max_value, bit);
  return y;
}

std::tuple<at::Tensor, at::Tensor> learnable_forward_cpu(const at::Tensor& x, const at::Tensor& max_value, int64_t bit) {
  check_learnable_arguments(x, max_value, bit, "pact");
  check_cpu(x, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor masks = at::empty({2, mask_numel(x.numel())}, x.options().dtype(at::kByte));
  run_forward<true>(xc, y, masks.data_ptr<uint8_t>(), max_value, bit);
  return {y, masks};
}

// 1 / sqrt(numel * n), n = 2^bit - 1 (bit 32 included), in double.
double grad_scale(int64_t numel, int64_t bit) {
  return 1.0 / std::sqrt(static_cast<double>(numel) * (std::ldexp(1.0, static_cast<int>(bit)) - 1.0));
}

std::tuple<at::Tensor, at::Tensor> learnable_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& max_value, int64_t bit,
    c10::string_view mode_view, bool scale_grad) {
  const std::string mode(mode_view);
  check_learnable_backward_arguments(grad_y, saved, max_value, bit, mode);
  check_cpu(grad_y, "grad_y");
  const at::Tensor g = grad_y.contiguous();
  const int64_t numel = g.numel();
  at::Tensor grad_x = at::empty(g.sizes(), g.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  const bool pact = mode == "pact";
  std::vector<double> in_part(pact ? 0 : blocks, 0.0);
  std::vector<double> above_part(blocks, 0.0);
  double m_eff = 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "learnable_backward_cpu", [&] {
    using T = compute_t<scalar_t>;
    const auto c = make_consts<T>(max_value, bit);
    m_eff = static_cast<double>(c.m);
    const scalar_t* gy = g.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    if (pact) {
      const at::Tensor masks = saved.contiguous();
      const uint8_t* p = masks.const_data_ptr<uint8_t>();
      const uint8_t* a = p + mask_numel(numel);
      with_isa([&](auto isa) {
        using Isa = decltype(isa);
        at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            const int64_t off = b * kBlock;
            above_part[b] = Isa::template pact<scalar_t>(
                gy + off, gx + off, p + off / 8, a + off / 8, std::min(kBlock, numel - off));
          }
        });
      });
    } else {
      const at::Tensor xs = saved.contiguous();
      const scalar_t* x = xs.const_data_ptr<scalar_t>();
      with_isa([&](auto isa) {
        using Isa = decltype(isa);
        at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            const int64_t off = b * kBlock;
            Isa::template lsq<scalar_t>(
                gy + off, gx + off, x + off, std::min(kBlock, numel - off), c, &in_part[b], &above_part[b]);
          }
        });
      });
    }
  });
  // The per-block sums, in block order, on this thread.
  double in_sum = 0.0;
  double above_sum = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (!pact) {
      in_sum += in_part[b];
    }
    above_sum += above_part[b];
  }
  double total = pact ? above_sum : in_sum / m_eff + above_sum;
  if (scale_grad && numel > 0) {
    total *= grad_scale(numel, bit);
  }
  at::Tensor grad_m = at::full({}, total, max_value.options().dtype(at::kDouble)).to(max_value.scalar_type());
  return {grad_x, grad_m};
}

}  // namespace
}  // namespace cpu_learnable
}  // namespace torch_ext

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("linear_mid_tread_half_quantize_learnable", &torch_ext::cpu_learnable::learnable_cpu);
  m.impl("linear_mid_tread_half_quantize_learnable_forward", &torch_ext::cpu_learnable::learnable_forward_cpu);
  m.impl("linear_mid_tread_half_quantize_learnable_backward", &torch_ext::cpu_learnable::learnable_backward_cpu);
}
