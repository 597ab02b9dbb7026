// The learnable-max_value operators (docs/quantizer.md, "Learnable max_value"):
// the quantizer of formula.h with m read from a 0-dim tensor on x's device,
// and a backward that returns grad_x and grad_max_value in one pass.
//
// Modes of the gradient of y with respect to m:
//   pact: dy/dm = 1 where x >= m, else 0 (Choi et al. 2018).
//   lsq:  dy/dm = (y - x) / m where 0 < x < m, 1 where x >= m, 0 where x <= 0
//         (Esser et al. 2019, for this quantizer).
// With scale_grad, grad_max_value is multiplied by 1 / sqrt(numel * n),
// n = 2^bit - 1 (LSQ's gradient scale).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace torch_ext {

// y, as linear_mid_tread_half_quantize(x, bit, m) for m = the value of
// max_value in x's compute type, clamped as learnable::effective_max_value does.
at::Tensor linear_mid_tread_half_quantize_learnable(
    const at::Tensor& x, const at::Tensor& max_value, int64_t bit, const std::string& mode, bool scale_grad);

// The kernels it is made of. The PACT forward returns y and two packed masks
// (a uint8 tensor of shape [2, mask_numel]: row 0 is `0 < x < m`, row 1 is
// `x >= m`, 8 elements a byte, row-major order of x). The backward takes the
// masks (pact) or x itself (lsq) as `saved`.
std::tuple<at::Tensor, at::Tensor> linear_mid_tread_half_quantize_learnable_forward(
    const at::Tensor& x, const at::Tensor& max_value, int64_t bit);
std::tuple<at::Tensor, at::Tensor> linear_mid_tread_half_quantize_learnable_backward(
    const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& max_value, int64_t bit,
    const std::string& mode, bool scale_grad);

// Throw c10::ValueError / c10::TypeError naming the argument and its value.
void check_learnable_arguments(const at::Tensor& x, const at::Tensor& max_value, int64_t bit, const std::string& mode);
void check_learnable_backward_arguments(
    const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& max_value, int64_t bit,
    const std::string& mode);

namespace learnable {

// The range m is clamped to, in the compute type T of x, inside the kernels
// (no host-device synchronisation): from the smallest positive value of T
// to the largest finite one, exactly the values of T that the fixed
// operator accepts. NaN, 0 and negative values become the floor, +inf the
// ceiling.
template <typename T>
struct Range;
template <>
struct Range<float> {
  static constexpr float floor = 0x1p-149f;
  static constexpr float ceiling = 0x1.fffffep+127f;
};
template <>
struct Range<double> {
  static constexpr double floor = 0x1p-1074;
  static constexpr double ceiling = 0x1.fffffffffffffp+1023;
};

template <typename T>
C10_HOST_DEVICE inline T effective_max_value(T m) {
  // NaN fails `m >= lo` and lands on the floor.
  const T lo = Range<T>::floor;
  const T hi = Range<T>::ceiling;
  return m > hi ? hi : (m >= lo ? m : lo);
}

enum class Mode { kPact, kLsq };

}  // namespace learnable
}  // namespace torch_ext
