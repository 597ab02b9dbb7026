// The C++ entry point torch_ext::linear_mid_tread_half_quantize: values of
// docs/quantizer.md, the gradient, the packed mask, and refused input.

#include <torch_ext/torch_ext.h>

#include <torch/torch.h>
// torch's logging defines a CHECK of its own: Catch2's must be the one the tests use.
#undef CHECK
#include "catch_compat.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

// docs/quantizer.md in plain C++ double/float arithmetic, one element at a time.
float spec_float(float x, int bit, double max_value) {
  const float m = static_cast<float>(max_value);
  float c = x < 0.0f ? 0.0f : (x > m ? m : x);
  if (bit == 32) {
    return c;
  }
  const float n = static_cast<float>(std::ldexp(1.0, bit) - 1.0);
  volatile float v = c / m;  // volatile: one rounding a step, whatever the flags
  v = v * n;
  v = v + 0.5f;
  float level = std::floor(static_cast<float>(v));
  volatile float w = level / n;
  w = w * m;
  return w;
}

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) {
    return false;
  }
  const auto ints = a.element_size() == 8 ? at::kLong : (a.element_size() == 4 ? at::kInt : at::kShort);
  return at::equal(a.contiguous().view(ints), b.contiguous().view(ints));
}

}  // namespace

TEST_CASE("ties round up and the documented example holds", "[forward]") {
  // bit=1, max_value=2: x=1.0 is the tie and goes to 2.0 (torch.round gives 0).
  auto y = torch_ext::linear_mid_tread_half_quantize(torch::tensor({1.0f}), 1, 2.0);
  CHECK(y.item<float>() == 2.0f);
  auto y2 = torch_ext::linear_mid_tread_half_quantize(torch::tensor({0.999f, 1.0f, 1.5f}), 2, 3.0);
  // n = 3, m = 3: levels at 0, 1, 2, 3; 1.5 is the tie between 1 and 2.
  CHECK(y2[0].item<float>() == 1.0f);
  CHECK(y2[1].item<float>() == 1.0f);
  CHECK(y2[2].item<float>() == 2.0f);
}

TEST_CASE("float32 matches the element-by-element formula for every bit width", "[forward]") {
  const std::vector<float> special = {
      0.0f, -0.0f, -1.0f, 0.25f, 0.5f, 1.0f, 1.999f, 2.0f, 2.0001f, 1e30f, -1e30f,
      std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
      std::numeric_limits<float>::denorm_min()};
  torch::manual_seed(0);
  auto x = torch::cat({torch::tensor(special), torch::rand({1000}) * 3.0 - 0.5});
  for (int bit : {1, 2, 3, 4, 8, 12, 16, 32}) {
    for (double m : {2.0, 1.0 / 3.0, 6.0}) {
      auto y = torch_ext::linear_mid_tread_half_quantize(x, bit, m);
      REQUIRE(y.scalar_type() == at::kFloat);
      auto xa = x.accessor<float, 1>();
      auto ya = y.accessor<float, 1>();
      for (int64_t i = 0; i < x.numel(); ++i) {
        const float expected = spec_float(xa[i], bit, m);
        INFO("bit=" << bit << " m=" << m << " x=" << xa[i]);
        REQUIRE(std::signbit(ya[i]) == std::signbit(expected));
        REQUIRE(ya[i] == expected);
      }
    }
  }
}

TEST_CASE("NaN stays NaN, infinities clip", "[forward]") {
  const float inf = std::numeric_limits<float>::infinity();
  auto y = torch_ext::linear_mid_tread_half_quantize(torch::tensor({std::nanf(""), inf, -inf}), 2, 2.0);
  CHECK(std::isnan(y[0].item<float>()));
  CHECK(y[1].item<float>() == 2.0f);
  CHECK(y[2].item<float>() == 0.0f);
}

TEST_CASE("every dtype keeps its dtype and strided inputs give the contiguous result", "[forward]") {
  torch::manual_seed(1);
  auto base = torch::randn({4, 6, 5, 3}) * 2.0;
  for (auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    auto x = base.to(dtype);
    auto expected = torch_ext::linear_mid_tread_half_quantize(x, 3, 2.0);
    CHECK(expected.scalar_type() == dtype);
    auto cl = x.contiguous(at::MemoryFormat::ChannelsLast);
    auto y_cl = torch_ext::linear_mid_tread_half_quantize(cl, 3, 2.0);
    CHECK(y_cl.is_contiguous(at::MemoryFormat::ChannelsLast));
    CHECK(same_bits(y_cl, expected));
    auto t = x.transpose(1, 3);
    CHECK(same_bits(torch_ext::linear_mid_tread_half_quantize(t, 3, 2.0), expected.transpose(1, 3)));
    auto s = x.slice(1, 0, 6, 2);
    CHECK(same_bits(torch_ext::linear_mid_tread_half_quantize(s, 3, 2.0), expected.slice(1, 0, 6, 2)));
  }
}

TEST_CASE("empty and 0-dim tensors are valid", "[forward]") {
  auto e = torch_ext::linear_mid_tread_half_quantize(torch::empty({0, 3}), 2, 2.0);
  CHECK(e.sizes() == at::IntArrayRef({0, 3}));
  auto s = torch_ext::linear_mid_tread_half_quantize(torch::tensor(1.2f), 2, 2.0);
  CHECK(s.dim() == 0);
  CHECK(s.item<float>() == spec_float(1.2f, 2, 2.0));
}

TEST_CASE("the gradient passes exactly where 0 < x < max_value", "[backward]") {
  const float inf = std::numeric_limits<float>::infinity();
  auto x = torch::tensor({-1.0f, 0.0f, 0.5f, 1.0f, 1.99f, 2.0f, 3.0f, std::nanf("")}).requires_grad_(true);
  auto y = torch_ext::linear_mid_tread_half_quantize(x, 2, 2.0);
  auto grad_y = torch::tensor({inf, inf, 3.0f, -2.0f, 7.0f, std::nanf(""), inf, 5.0f});
  y.backward(grad_y);
  auto g = x.grad();
  const std::vector<float> expected = {0.0f, 0.0f, 3.0f, -2.0f, 7.0f, 0.0f, 0.0f, 0.0f};
  for (size_t i = 0; i < expected.size(); ++i) {
    INFO("element " << i);
    CHECK(g[i].item<float>() == expected[i]);
  }
}

TEST_CASE("the forward op packs the mask 8 elements a byte, row-major", "[mask]") {
  auto x = torch::tensor({0.5f, -1.0f, 1.0f, 2.0f, 0.1f, 0.0f, 1.9f, 5.0f, 0.3f, 3.0f});
  auto [y, mask] = torch_ext::linear_mid_tread_half_quantize_forward(x, 2, 2.0);
  REQUIRE(mask.scalar_type() == at::kByte);
  REQUIRE(mask.numel() == 2);
  // bits: 1,0,1,0,1,0,1,0 -> 0b01010101; then 1,0 -> 0b01
  CHECK(mask[0].item<uint8_t>() == 0x55);
  CHECK(mask[1].item<uint8_t>() == 0x01);
  auto grad = torch_ext::linear_mid_tread_half_quantize_backward(torch::ones({10}), mask);
  CHECK(grad.sum().item<float>() == 5.0f);
}

TEST_CASE("a channels_last x: the mask in memory order, grad_x in x's layout", "[mask][layout]") {
  // x[0, c, h, w] = c + 10 * h + 100 * w - 30, stored NHWC.
  auto x = (torch::arange(2 * 3 * 4, torch::kFloat).reshape({1, 2, 3, 4}) - 3.0f)
               .contiguous(at::MemoryFormat::ChannelsLast);
  REQUIRE(!x.is_contiguous());
  auto [y, mask] = torch_ext::linear_mid_tread_half_quantize_forward(x, 2, 2.0);
  CHECK(y.strides() == x.strides());
  // Bit k of the mask is the element at memory offset k of x.
  const float* memory = x.const_data_ptr<float>();
  for (int64_t k = 0; k < x.numel(); ++k) {
    INFO("offset " << k);
    const bool expected = memory[k] > 0.0f && memory[k] < 2.0f;
    CHECK(((mask[k / 8].item<uint8_t>() >> (k % 8)) & 1) == static_cast<int>(expected));
  }
  const auto inside = torch::logical_and(x > 0, x < 2);
  auto g = torch::arange(x.numel(), torch::kFloat).reshape(x.sizes()) + 1.0f;  // row-major
  for (const auto& gl : {g, g.contiguous(at::MemoryFormat::ChannelsLast)}) {
    auto grad = torch_ext::linear_mid_tread_half_quantize_backward(gl, mask, y.strides());
    CHECK(grad.strides() == x.strides());
    CHECK(torch::equal(grad, torch::where(inside, gl, torch::zeros({}))));
  }
  // Through autograd: a channels_last leaf gets a channels_last gradient.
  auto leaf = x.detach().clone().requires_grad_(true);
  torch_ext::linear_mid_tread_half_quantize(leaf, 2, 2.0).backward(g);
  CHECK(leaf.grad().is_contiguous(at::MemoryFormat::ChannelsLast));
  CHECK(torch::equal(leaf.grad(), torch::where(inside, g, torch::zeros({}))));
  // Strides of the wrong length or of no dense layout are refused.
  CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize_backward(g, mask, {1, 2}), c10::ValueError);
  CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize_backward(g, mask, {0, 0, 0, 0}), c10::ValueError);
}

TEST_CASE("in place writes into x and keeps the gradient of the original x", "[inplace]") {
  auto leaf = torch::tensor({-1.0f, 0.5f, 1.5f, 3.0f}).requires_grad_(true);
  auto x = leaf * 1.0f;
  auto& out = torch_ext::linear_mid_tread_half_quantize_(x, 1, 2.0);
  CHECK(out.is_same(x));
  CHECK(x[3].item<float>() == 2.0f);
  x.sum().backward();
  auto g = leaf.grad();
  CHECK(g[0].item<float>() == 0.0f);
  CHECK(g[1].item<float>() == 1.0f);
  CHECK(g[2].item<float>() == 1.0f);
  CHECK(g[3].item<float>() == 0.0f);
}

TEST_CASE("in place on a leaf that requires grad is refused and x is untouched", "[inplace][refused]") {
  auto leaf = torch::tensor({3.0f, 0.7f}).requires_grad_(true);
  CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize_(leaf, 2, 2.0), c10::Error);
  CHECK(leaf[0].item<float>() == 3.0f);
}

TEST_CASE("refused arguments throw ValueError and TypeError naming the value", "[refused]") {
  auto x = torch::ones({3});
  for (int64_t bit : {0, 17, 31, 33, -1}) {
    INFO("bit=" << bit);
    CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize(x, bit, 2.0), c10::ValueError);
  }
  try {
    torch_ext::linear_mid_tread_half_quantize(x, 17, 2.0);
    FAIL("bit=17 was accepted");
  } catch (const c10::ValueError& e) {
    CHECK(std::string(e.what_without_backtrace()).find("bit=17") != std::string::npos);
  }
  for (double m : {0.0, -1.0, std::nan(""), HUGE_VAL, -HUGE_VAL}) {
    INFO("max_value=" << m);
    CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize(x, 2, m), c10::ValueError);
  }
  for (auto dtype : {at::kInt, at::kLong, at::kBool, at::kByte, at::kComplexFloat}) {
    INFO("dtype=" << dtype);
    CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize(torch::ones({3}, dtype), 2, 2.0), c10::TypeError);
  }
  auto y = torch::tensor({5.0f});
  CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize_(y, 0, 2.0), c10::ValueError);
  CHECK(y.item<float>() == 5.0f);
}

TEST_CASE("a mask of the wrong size is refused by the backward", "[refused]") {
  auto mask = torch::zeros({3}, at::kByte);
  CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize_backward(torch::ones({9}), mask), c10::ValueError);
}

TEST_CASE("the backward refuses a non-floating grad_y and a mask that is no uint8 vector", "[refused]") {
  const auto mask = torch::zeros({2}, at::kByte);
  CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize_backward(torch::ones({10}, at::kInt), mask), c10::TypeError);
  CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize_backward(torch::ones({10}), mask.to(at::kInt)), c10::TypeError);
  CHECK_THROWS_AS(
      torch_ext::linear_mid_tread_half_quantize_backward(torch::ones({10}), torch::zeros({1, 2}, at::kByte)),
      c10::ValueError);
  CHECK_THROWS_AS(torch_ext::check_backward_arguments(torch::ones({10}), torch::zeros({1}, at::kByte)), c10::ValueError);
  CHECK_NOTHROW(torch_ext::check_backward_arguments(torch::ones({10}, at::kHalf), mask));
}

TEST_CASE("max_value that rounds to 0 or infinity in float32 is refused unless x is float64", "[refused]") {
  // float32 rounds to nearest even: 2^-150 (half the smallest subnormal)
  // rounds to 0, 2^128 - 2^103 (half an ulp above FLT_MAX) to infinity.
  const double rounds_to_zero = std::ldexp(1.0, -150);
  const double rounds_to_inf = std::ldexp(1.0, 128) - std::ldexp(1.0, 103);
  const std::vector<double> refused = {
      1e-46, rounds_to_zero, std::numeric_limits<double>::denorm_min(),
      1e39, rounds_to_inf, std::numeric_limits<double>::max()};
  const std::vector<double> accepted = {
      std::nextafter(rounds_to_zero, 1.0), static_cast<double>(std::numeric_limits<float>::denorm_min()),
      static_cast<double>(std::numeric_limits<float>::max()), std::nextafter(rounds_to_inf, 0.0)};
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const auto x = (torch::rand({64}, at::kDouble) * 4.0 - 1.0).to(dtype);
    for (double m : refused) {
      INFO("dtype=" << dtype << " max_value=" << m);
      CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize(x, 2, m), c10::ValueError);
      CHECK_THROWS_AS(torch_ext::check_quantize_arguments(dtype, 2, m), c10::ValueError);
      CHECK_THROWS_AS(torch_ext::check_max_value(m, dtype), c10::ValueError);
      CHECK_NOTHROW(torch_ext::check_max_value(m));  // finite and > 0: only the dtype refuses it
      auto xi = x.clone();
      CHECK_THROWS_AS(torch_ext::linear_mid_tread_half_quantize_(xi, 2, m), c10::ValueError);
      CHECK(at::equal(xi, x));
    }
    for (double m : accepted) {
      INFO("dtype=" << dtype << " max_value=" << m);
      const auto y = torch_ext::linear_mid_tread_half_quantize(x, 2, m);
      CHECK(!y.isnan().any().item<bool>());
    }
  }
  try {
    torch_ext::linear_mid_tread_half_quantize(torch::ones({3}), 2, 1e39);
    FAIL("max_value=1e39 was accepted for float32");
  } catch (const c10::ValueError& e) {
    const std::string what = e.what_without_backtrace();
    INFO(what);
    CHECK(what.find("max_value=1e+39 rounds to infinity in float32, the compute type of x of dtype Float") !=
          std::string::npos);
  }
  // float64 computes in float64: every finite max_value > 0 is taken, with no NaN.
  const auto x64 = torch::rand({64}, at::kDouble) * 4.0 - 1.0;
  for (double m : refused) {
    INFO("float64 max_value=" << m);
    const auto y = torch_ext::linear_mid_tread_half_quantize(x64 * m, 2, m);
    CHECK(!y.isnan().any().item<bool>());
  }
}
