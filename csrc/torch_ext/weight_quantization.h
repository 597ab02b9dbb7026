// Blueoil's binary weight quantizers (docs/quantizer.md, "Weight quantizers")
// as registered operators: torch_ext::binary_mean_scaling_quantize and
// torch_ext::binary_channel_wise_mean_scaling_quantize. The functions here
// call through the dispatcher, so they are differentiable (straight-through:
// grad_w = grad_y) and run on every device ATen runs on.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torch_ext {

// where(w >= 0, 1, -1) * mean(|w|), the mean over the whole tensor (an exact
// 0 maps to +mean). w: any floating tensor; the result has w's shape, dtype,
// device and dense layout.
at::Tensor binary_mean_scaling_quantize(const at::Tensor& w);

// The same with mean(|w|) per output channel: over dims 1 .. w.dim()-1 (a
// 1-D w is its own per-channel scale). w needs at least one dim.
at::Tensor binary_channel_wise_mean_scaling_quantize(const at::Tensor& w);

// The argument checks both operators run before any work, with the wording
// of torch_ext/weight_quantization.py: c10::TypeError when w is not
// floating (the message names `op`, w and its dtype), and for the
// channel-wise quantizer c10::ValueError when w is 0-dim.
void check_weight(const char* op, at::ScalarType dtype);
void check_channel_wise_weight_dim(int64_t dim);

}  // namespace torch_ext
