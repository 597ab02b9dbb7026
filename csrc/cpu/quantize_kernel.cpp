// CPU kernels of the linear mid-tread half quantizer (the fixed quantizer
// family: schemas, checks and autograd in csrc/ops/quantize.cpp).
//
// The loops are plain C++ over one contiguous span, compiled three times:
// for the baseline x86-64 ISA, for AVX2 and for AVX-512, picked at each call
// (cpu_isa.h: the widest the CPU has, TORCH_EXT_CPU_ISA caps it); only the
// packing of the mask is written with AVX2 intrinsics (movemask). The
// baseline ISA has no vector floor (it needs SSE4.1's roundps), so without
// the wider copies the formula would run one element at a time. Each step of
// docs/quantizer.md stays one correctly rounded operation in every copy (no
// FMA, no reciprocal), so they give bit-identical results, whatever the ISA
// and the thread count. For 1 to 3 bits (4 for float16/bfloat16) the forward does
// not divide at all: it compares with the thresholds of steps.h.
#include "torch_ext/cpu_isa.h"
#include "torch_ext/formula.h"
#include "torch_ext/mask_bits.h"
#include "torch_ext/layouts.h"
#include "torch_ext/steps.h"
#include "torch_ext/storage.h"
#include "torch_ext/torch_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

namespace torch_ext {
namespace cpu {
namespace {

using formula::compute_t;
using formula::Params;

// Elements a block: 32 mask bytes. Blocks are the unit of work of a thread,
// so no two threads ever write to the same mask byte.
constexpr int64_t kBlock = 256;
// At least this many elements a thread (ATen's own grain size).
constexpr int64_t kGrainElements = 32768;

using mask_bits::bits_t;
using mask_bits::kUnpack;

using storage::bit_cast;
using storage::Storage;

// What a forward loop computes, on the bits of each x: whether the gradient
// passes, and the bits of the result. Either through the compute type (the
// clip of bit == 32, or the formula) or, for 1 to 3 bits (4 for float16 and
// bfloat16), by the steps of steps.h, which give the same bits with no
// division and no conversion.
template <typename scalar_t, typename Compute>
struct ThroughComputeType {
  using B = bits_t<scalar_t>;
  using S = Storage<scalar_t>;
  compute_t<scalar_t> m;
  Compute compute;
  C10_ALWAYS_INLINE bool passes(B x) const {
    return formula::passes_gradient(S::load(x), m);
  }
  C10_ALWAYS_INLINE B operator()(B x) const {
    return S::store(compute(S::load(x)));
  }
};

template <typename T>
struct ClipOnly {
  T m;
  C10_ALWAYS_INLINE T operator()(T x) const {
    return formula::clip(x, m);
  }
};

template <typename T>
struct Formula {
  T m;
  T n;
  C10_ALWAYS_INLINE T operator()(T x) const {
    return formula::quantize_levels(x, m, n);
  }
};

// Lane flags (all ones or zero, as wide as the elements: what a vector
// compare gives, so the flag loop needs no narrowing) -> `bytes` mask bytes;
// flags is 64-byte aligned and holds 8 * bytes flags.
struct PackLanes {
  template <typename B>
  static C10_ALWAYS_INLINE void run(const B* flags, uint8_t* mask, int64_t bytes) {
    for (int64_t b = 0; b < bytes; ++b) {
      unsigned v = 0;
      for (int i = 0; i < 8; ++i) {
        v |= static_cast<unsigned>(flags[8 * b + i] & 1u) << i;
      }
      mask[b] = static_cast<uint8_t>(v);
    }
  }
};

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TORCH_EXT_HAVE_AVX2 1
// AVX2: the top bit of each lane gathered by movemask (lane i to bit i:
// element 0 of a mask byte in bit 0). Called once a block (not inlined: GCC
// inlines no AVX2 function into the ISA-neutral loop template, even when that
// is itself inlined into AVX2 code).
struct PackLanesAvx2 {
  __attribute__((target("avx2"))) static void run(const uint32_t* flags, uint8_t* mask, int64_t bytes) {
    for (int64_t b = 0; b < bytes; ++b) {
      const __m256 v = _mm256_load_ps(reinterpret_cast<const float*>(flags + 8 * b));
      mask[b] = static_cast<uint8_t>(_mm256_movemask_ps(v));
    }
  }
  __attribute__((target("avx2"))) static void run(const uint64_t* flags, uint8_t* mask, int64_t bytes) {
    for (int64_t b = 0; b < bytes; ++b) {
      const __m256d lo = _mm256_load_pd(reinterpret_cast<const double*>(flags + 8 * b));
      const __m256d hi = _mm256_load_pd(reinterpret_cast<const double*>(flags + 8 * b + 4));
      mask[b] = static_cast<uint8_t>(_mm256_movemask_pd(lo) | (_mm256_movemask_pd(hi) << 4));
    }
  }
  __attribute__((target("avx2"))) static void run(const uint16_t* flags, uint8_t* mask, int64_t bytes) {
    int64_t b = 0;
    for (; b + 4 <= bytes; b += 4) {
      // 32 lanes -> 32 bytes (signed saturation keeps 0 and -1), in the lane
      // order that the 64-bit permute restores, -> 32 bits.
      const __m256i lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(flags + 8 * b));
      const __m256i hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(flags + 8 * b + 16));
      const __m256i bytes8 = _mm256_permute4x64_epi64(_mm256_packs_epi16(lo, hi), 0xD8);
      const uint32_t bits = static_cast<uint32_t>(_mm256_movemask_epi8(bytes8));
      std::memcpy(mask + b, &bits, 4);
    }
    PackLanes::run(flags + 8 * b, mask + b, bytes - b);
  }
};
#endif

// The loops, written so that they vectorize (no calls, selects instead of
// branches; the forward's mask goes through lane-wide flags packed by Pack,
// the backward's is unpacked to a byte array). They are
// always inlined into the per-ISA entry points below, so each ISA gets its
// own vectorization of the same source.
template <typename Pack, typename scalar_t, bool kWriteMask, typename Quantize>
C10_ALWAYS_INLINE void forward_block_impl(
    const scalar_t* x, scalar_t* y, uint8_t* mask, int64_t count, const Quantize& quantize) {
  using B = bits_t<scalar_t>;
  const Quantize q = quantize;
  // x and y are read and written through their bits with memcpy (the
  // defined way to pun, which compilers vectorize like plain loads/stores).
  const auto load = [x](int64_t j) {
    B b;
    std::memcpy(&b, x + j, sizeof(B));
    return b;
  };
  if (kWriteMask) {
    // One pass: each x is read before its y is written (in place, y is x).
    alignas(64) B flags[kBlock];
    for (int64_t j = 0; j < count; ++j) {
      const B b = load(j);
      flags[j] = B(0) - static_cast<B>(q.passes(b));
      const B bits = q(b);
      std::memcpy(y + j, &bits, sizeof(B));
    }
    const int64_t bytes = mask_numel(count);
    for (int64_t j = count; j < 8 * bytes; ++j) {
      flags[j] = 0;
    }
    Pack::run(flags, mask, bytes);
    return;
  }
  // Any NaN result goes out as the one NaN pattern of formula.h that the
  // CUDA kernels write too.
  for (int64_t j = 0; j < count; ++j) {
    const B bits = q(load(j));
    std::memcpy(y + j, &bits, sizeof(B));
  }
}

template <typename scalar_t>
C10_ALWAYS_INLINE void backward_block_impl(
    const scalar_t* grad_y, scalar_t* grad_x, const uint8_t* mask, int64_t count) {
  using B = bits_t<scalar_t>;
  alignas(64) uint8_t flags[kBlock];
  const int64_t bytes = mask_numel(count);
  for (int64_t b = 0; b < bytes; ++b) {
    std::memcpy(flags + 8 * b, &kUnpack.flags[mask[b]], 8);
  }
  // Through the bits with memcpy (the defined way to pun; it vectorizes like
  // plain loads and stores): grad_y and grad_x are scalar_t objects.
  for (int64_t j = 0; j < count; ++j) {
    B g;
    std::memcpy(&g, grad_y + j, sizeof(B));
    g &= B(0) - static_cast<B>(flags[j]);
    std::memcpy(grad_x + j, &g, sizeof(B));
  }
}

// Per-ISA entry points. AVX2 does not imply FMA, and -ffp-contract=off would
// forbid contraction anyway; -fno-trapping-math (setup.py, CMakeLists.txt)
// lets GCC vectorize floor and the selects without changing any result.
struct Baseline {
  template <typename scalar_t, bool kWriteMask, typename Quantize>
  static void forward(const scalar_t* x, scalar_t* y, uint8_t* mask, int64_t count, const Quantize& q) {
    forward_block_impl<PackLanes, scalar_t, kWriteMask>(x, y, mask, count, q);
  }
  template <typename scalar_t>
  static void backward(const scalar_t* g, scalar_t* out, const uint8_t* mask, int64_t count) {
    backward_block_impl<scalar_t>(g, out, mask, count);
  }
};

#ifdef TORCH_EXT_HAVE_AVX2
struct Avx2 {
  template <typename scalar_t, bool kWriteMask, typename Quantize>
  __attribute__((target("avx2"))) static void forward(
      const scalar_t* x, scalar_t* y, uint8_t* mask, int64_t count, const Quantize& q) {
    forward_block_impl<PackLanesAvx2, scalar_t, kWriteMask>(x, y, mask, count, q);
  }
  template <typename scalar_t>
  __attribute__((target("avx2"))) static void backward(
      const scalar_t* g, scalar_t* out, const uint8_t* mask, int64_t count) {
    backward_block_impl<scalar_t>(g, out, mask, count);
  }
};

// AVX-512 with 512-bit vectors (GCC prefers 256-bit ones by default): twice
// the lanes for the compares and selects of the steps, and for the formula's
// divisions. The mask is still packed by the AVX2 function.
#define TORCH_EXT_AVX512_LOOPS \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,prefer-vector-width=512")))
struct Avx512 {
  template <typename scalar_t, bool kWriteMask, typename Quantize>
  TORCH_EXT_AVX512_LOOPS static void forward(
      const scalar_t* x, scalar_t* y, uint8_t* mask, int64_t count, const Quantize& q) {
    forward_block_impl<PackLanesAvx2, scalar_t, kWriteMask>(x, y, mask, count, q);
  }
  template <typename scalar_t>
  TORCH_EXT_AVX512_LOOPS static void backward(const scalar_t* g, scalar_t* out, const uint8_t* mask, int64_t count) {
    backward_block_impl<scalar_t>(g, out, mask, count);
  }
};
#endif

// Prefetch the next page of the input, a block's worth of lines at a time.
// Each output page a call writes for the first time is a page fault (glibc
// maps every large output afresh), and the hardware prefetchers lose the
// input stream at each one; without this the out-of-place loops ran 8-13%
// behind torch.relu on fresh outputs (and equal to it on reused memory).
constexpr int64_t kPrefetchAhead = 4096;

template <typename scalar_t>
C10_ALWAYS_INLINE void prefetch_next_page(const scalar_t* block, const scalar_t* end) {
  const char* ahead = reinterpret_cast<const char*>(block) + kPrefetchAhead;
  const char* stop = std::min(ahead + kBlock * static_cast<int64_t>(sizeof(scalar_t)),
                              reinterpret_cast<const char*>(end));
  for (; ahead < stop; ahead += 64) {
    __builtin_prefetch(ahead);
  }
}

// f(offset, count) for each block of a span of numel elements, blocks spread
// over ATen's threads, with the next page of `input` prefetched first.
template <typename scalar_t, typename F>
void for_each_block(const scalar_t* input, int64_t numel, F&& f) {
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainElements / kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t offset = block * kBlock;
      prefetch_next_page(input + offset, input + numel);
      f(offset, std::min(kBlock, numel - offset));
    }
  });
}

// f(Isa{}) with the widest copy of the loops that the CPU has and
// TORCH_EXT_CPU_ISA allows.
template <typename F>
void with_isa(F&& f) {
#ifdef TORCH_EXT_HAVE_AVX2
  const int isa = cpu_isa();
  if (isa >= kIsaAvx512) {
    f(Avx512{});
    return;
  }
  if (isa >= kIsaAvx2) {
    f(Avx2{});
    return;
  }
#endif
  f(Baseline{});
}

template <typename scalar_t, bool kWriteMask, typename Quantize>
void forward_span_with(const scalar_t* x, scalar_t* y, uint8_t* mask, int64_t numel, const Quantize& q) {
  with_isa([&](auto isa) {
    using Isa = decltype(isa);
    for_each_block(x, numel, [&](int64_t offset, int64_t count) {
      Isa::template forward<scalar_t, kWriteMask>(
          x + offset, y + offset, kWriteMask ? mask + offset / 8 : nullptr, count, q);
    });
  });
}

// The forward over a span, with the cheapest exact form of the formula for
// this bit width.
template <typename scalar_t, bool kWriteMask>
void forward_span(const scalar_t* x, scalar_t* y, uint8_t* mask, int64_t numel, Params<compute_t<scalar_t>> p) {
  using T = compute_t<scalar_t>;
  using S = Storage<scalar_t>;
  const T m = p.max_value;
  const auto run = [&](const auto& q) { forward_span_with<scalar_t, kWriteMask>(x, y, mask, numel, q); };
  if (p.clip_only && sizeof(scalar_t) == 2) {
    run(steps::make_clip<scalar_t, S>(m));
  } else if (p.clip_only) {
    run(ThroughComputeType<scalar_t, ClipOnly<T>>{m, {m}});
  } else if (p.levels == T(1)) {
    run(steps::make_steps<scalar_t, 1, S>(m));
  } else if (p.levels == T(3)) {
    run(steps::make_steps<scalar_t, 3, S>(m));
  } else if (p.levels == T(7)) {
    run(steps::make_steps<scalar_t, 7, S>(m));
  } else if (p.levels == T(15) && sizeof(scalar_t) == 2) {
    // 15 compare-selects beat the divisions only on 16-bit lanes (measured:
    // 2x slower than the formula for float32 and float64).
    run(steps::make_steps<scalar_t, 15, S>(m));
  } else {
    run(ThroughComputeType<scalar_t, Formula<T>>{m, {m, p.levels}});
  }
}

template <typename scalar_t>
void backward_span(const scalar_t* grad_y, scalar_t* grad_x, const uint8_t* mask, int64_t numel) {
  with_isa([&](auto isa) {
    using Isa = decltype(isa);
    for_each_block(grad_y, numel, [&](int64_t offset, int64_t count) {
      Isa::template backward<scalar_t>(grad_y + offset, grad_x + offset, mask + offset / 8, count);
    });
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

at::Tensor backward_cpu(const at::Tensor& grad_y, const at::Tensor& mask, at::OptionalSymIntArrayRef x_strides) {
  check_backward_arguments(grad_y, mask);
  check_cpu(grad_y, "grad_y");
  return layouts::backward(grad_y, mask, x_strides, [](const at::Tensor& g, const at::Tensor& out, const uint8_t* m) {
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
