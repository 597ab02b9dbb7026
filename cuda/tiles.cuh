// The memory path of every elementwise CUDA kernel of torch_ext: the fixed
// quantizer's forward and backward and the learnable max_value's.
//
// A block walks tiles of kThreads x kVecs 16-byte vectors (grid-stride, 64-bit
// indices, so tensors of more than 2^31 elements are covered). Vector v of
// thread i of a tile starts at element (v * kThreads + i) * kVecElems: each
// load or store instruction of a warp covers 512 contiguous bytes, and every
// thread has kVecs 128-bit loads in flight before it computes (64 bytes a
// thread, what an H200 needs at 4.8 TB/s with a full SM of 2048 threads).
//
// The packed masks (one bit an element, memory order, element 0 of a byte in
// bit 0) follow the vectors: a vector of kVecElems elements is kVecElems bits;
// lanes next to each other hold neighbouring bits, so for float32 and float64
// the bits of 2 or 4 lanes are gathered into one byte with warp shuffles and
// one lane stores it. A warp's mask bytes are contiguous too.
//
// Full tiles of 16-byte-aligned tensors take 128-bit accesses; the last,
// partial tile (and every tile of a misaligned view) takes the same steps
// with one access an element, bounds-checked. The two are separate loops, so
// the vectorized one has no bounds check.
#pragma once

#include "torch_ext/mask_bits.h"
#include "torch_ext/storage.h"

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

namespace torch_ext {
namespace cuda_tiles {

using mask_bits::bits_t;

constexpr int kThreads = 256;
constexpr int kVecBytes = 16;
constexpr int kVecs = 4;  // 16-byte vectors a thread a tile: 64 bytes in flight
constexpr unsigned kFullWarp = 0xFFFFFFFFu;
// Blocks a multiprocessor must hold (__launch_bounds__): 3 x 256 threads x
// 64 bytes = 48 KiB in flight an SM, more than an H200's latency needs at
// full bandwidth (about 4.8 TB/s x 1 us / 132 SMs = 36 KiB); it caps a kernel
// at 85 registers a thread, enough for a float16 tile and its two masks
// without spilling. A kernel that loads two tiles a step (LSQ's backward: x
// and grad_y) has twice the bytes in flight at kMinBlocksTwoTiles.
constexpr int kMinBlocks = 3;
constexpr int kMinBlocksTwoTiles = 2;

template <typename scalar_t>
struct Tile {
  using B = bits_t<scalar_t>;
  static constexpr int kVecElems = kVecBytes / static_cast<int>(sizeof(scalar_t));
  static constexpr int kThreadElems = kVecs * kVecElems;  // a thread's elements a tile
  static constexpr int64_t kElems = static_cast<int64_t>(kThreads) * kThreadElems;

  // The first element of this thread's vector v in tile t.
  static __device__ __forceinline__ int64_t first(int64_t t, int v) {
    return t * kElems + (static_cast<int64_t>(v) * kThreads + threadIdx.x) * kVecElems;
  }
};

// A thread's elements of tile t, as bits, between global memory and
// registers. kFull: the tile lies inside numel and the pointer is 16-byte
// aligned, so each vector is one 128-bit access (memcpy through an aligned
// pointer: the defined way to pun, and nvcc emits ld/st.global.v4;
// __builtin_assume_aligned takes a void pointer: given a typed one, nvcc
// 13.0's front end emits invalid IR). Else one access an element, and
// elements past numel read as 0 and are not written.
template <bool kFull, typename scalar_t>
__device__ __forceinline__ void load_tile(
    const scalar_t* src, int64_t t, int64_t numel, bits_t<scalar_t> (&v)[Tile<scalar_t>::kThreadElems]) {
  using Tl = Tile<scalar_t>;
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int64_t first = Tl::first(t, k);
    bits_t<scalar_t>* dst = v + k * Tl::kVecElems;
    if (kFull) {
      memcpy(dst, __builtin_assume_aligned(static_cast<const void*>(src + first), kVecBytes), kVecBytes);
    } else {
#pragma unroll
      for (int j = 0; j < Tl::kVecElems; ++j) {
        // A typed load of the element (a memcpy of unknown alignment would
        // be compiled to byte loads).
        scalar_t value = storage::bit_cast<scalar_t>(bits_t<scalar_t>(0));
        if (first + j < numel) {
          value = src[first + j];
        }
        dst[j] = storage::bit_cast<bits_t<scalar_t>>(value);
      }
    }
  }
}

template <bool kFull, typename scalar_t>
__device__ __forceinline__ void store_tile(
    scalar_t* dst, int64_t t, int64_t numel, const bits_t<scalar_t> (&v)[Tile<scalar_t>::kThreadElems]) {
  using Tl = Tile<scalar_t>;
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int64_t first = Tl::first(t, k);
    const bits_t<scalar_t>* src = v + k * Tl::kVecElems;
    if (kFull) {
      memcpy(__builtin_assume_aligned(static_cast<void*>(dst + first), kVecBytes), src, kVecBytes);
    } else {
#pragma unroll
      for (int j = 0; j < Tl::kVecElems; ++j) {
        if (first + j < numel) {
          dst[first + j] = storage::bit_cast<scalar_t>(src[j]);
        }
      }
    }
  }
}

// The mask bits of vector k (bit j: element j) -> its byte of the packed
// mask, stored by the lane that owns the byte. Every lane of the warp must
// call it (the shuffles), with 0 bits past numel.
template <bool kFull, typename scalar_t>
__device__ __forceinline__ void store_mask_bits(uint8_t* mask, int64_t t, int k, int64_t numel, uint32_t bits) {
  using Tl = Tile<scalar_t>;
  constexpr int E = Tl::kVecElems;
#pragma unroll
  for (int s = 1; s * E < 8; s *= 2) {
    bits |= __shfl_down_sync(kFullWarp, bits, s) << (s * E);
  }
  const int64_t first = Tl::first(t, k);
  if ((threadIdx.x * E) % 8 == 0 && (kFull || first < numel)) {
    mask[first / 8] = static_cast<uint8_t>(bits);
  }
}

// The mask bits of a vector's values: bit j is pred(x[j]).
template <int N, typename T, typename Pred>
__device__ __forceinline__ uint32_t bits_where(const T (&x)[N], Pred pred) {
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    bits |= static_cast<uint32_t>(pred(x[j])) << j;
  }
  return bits;
}

// The mask bits of vector k (bit j: element j), read from its byte.
template <bool kFull, typename scalar_t>
__device__ __forceinline__ uint32_t load_mask_bits(const uint8_t* mask, int64_t t, int k, int64_t numel) {
  using Tl = Tile<scalar_t>;
  const int64_t first = Tl::first(t, k);
  if (!kFull && first >= numel) {
    return 0;
  }
  return static_cast<uint32_t>(mask[first / 8]) >> (first % 8);
}

// body(t, std::true_type) for every full tile when `aligned`, then
// body(t, std::false_type) for the rest, over this block's tiles.
template <typename scalar_t, typename Body>
__device__ __forceinline__ void for_each_tile(int64_t numel, bool aligned, Body&& body) {
  const int64_t tiles = (numel + Tile<scalar_t>::kElems - 1) / Tile<scalar_t>::kElems;
  const int64_t full = aligned ? numel / Tile<scalar_t>::kElems : 0;
  int64_t t = blockIdx.x;
  for (; t < full; t += gridDim.x) {
    body(t, std::true_type{});
  }
  for (; t < tiles; t += gridDim.x) {
    body(t, std::false_type{});
  }
}

// ---------------------------------------------------------------------------
// Host side.

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

// Blocks that fit on the device at once (multiprocessors x blocks a
// multiprocessor holds), asked of the runtime once per device and cached.
// Only the runtime's attribute queries: ATen/cuda/CUDAContext.h would pull in
// cuBLAS and cuSPARSE headers that a minimal toolkit does not have.
inline int64_t resident_blocks(c10::DeviceIndex device) {
  static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> once;
  static std::array<int64_t, C10_COMPILE_TIME_MAX_GPUS> blocks;
  TORCH_CHECK(
      device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "torch_ext: CUDA device index ", static_cast<int>(device),
      " out of range");
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

// The grid of a launch over numel elements of scalar_t: one block a tile,
// capped at what is resident (the kernels stride the grid) and at `cap`.
template <typename scalar_t>
int64_t grid_for(int64_t numel, c10::DeviceIndex device, int64_t cap = INT64_MAX) {
  const int64_t tiles = (numel + Tile<scalar_t>::kElems - 1) / Tile<scalar_t>::kElems;
  return std::max<int64_t>(1, std::min({tiles, resident_blocks(device), cap}));
}

}  // namespace cuda_tiles
}  // namespace torch_ext
