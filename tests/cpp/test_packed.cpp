// The bit-packed inference operators (csrc/torch_ext/packed.h) from C++:
// exact accumulators against a float64 reference convolution of integers
// (exact: every partial sum is an integer below 2^53), for every ISA the
// kernels have, the threshold and affine outputs, and the refusals.
#include "catch_compat.h"

#include <torch_ext/packed.h>

#include <torch/torch.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace {

at::Tensor reference_acc(const at::Tensor& codes, const at::Tensor& weight, int64_t stride, int64_t padding) {
  const auto sign = torch::where(weight >= 0, 1.0, -1.0).to(torch::kDouble);
  return torch::conv2d(codes.to(torch::kDouble), sign, {}, stride, padding).to(torch::kLong);
}

// Sets TORCH_EXT_CPU_ISA for the lifetime of the object ("" = unset).
struct IsaCap {
  explicit IsaCap(const std::string& isa) {
    if (isa.empty()) {
      unsetenv("TORCH_EXT_CPU_ISA");
    } else {
      setenv("TORCH_EXT_CPU_ISA", isa.c_str(), 1);
    }
  }
  ~IsaCap() { unsetenv("TORCH_EXT_CPU_ISA"); }
};

}  // namespace

TEST_CASE("pack_codes and unpack_codes round-trip for 1..130 channels", "[packed]") {
  torch::manual_seed(0);
  for (int64_t bit = 1; bit <= 4; ++bit) {
    for (int64_t c : {1, 5, 63, 64, 65, 130}) {
      const auto codes = torch::randint(0, int64_t(1) << bit, {2, c, 3, 5}, torch::kUInt8);
      const auto packed = torch_ext::pack_codes(codes, bit);
      CHECK(packed.sizes() == at::IntArrayRef({2, 3, 5, bit, torch_ext::packed_words(c)}));
      CHECK(torch::equal(torch_ext::unpack_codes(packed, c), codes));
    }
  }
}

TEST_CASE("packed_conv2d's accumulator is exactly sum(sign(w) * code) on every ISA", "[packed]") {
  torch::manual_seed(1);
  for (const std::string isa : {"baseline", "avx2", ""}) {
    IsaCap cap(isa);
    for (int64_t k : {1, 3, 5}) {
      for (int64_t stride : {1, 2}) {
        for (int64_t padding : {0, 1, 2}) {
          for (int64_t c : {1, 33, 64, 130}) {
            const int64_t bit = 1 + (c + k) % 4;
            const auto codes = torch::randint(0, int64_t(1) << bit, {3, c, 7, 6}, torch::kUInt8);
            auto weight = torch::randn({9, c, k, k});
            weight.masked_fill_(weight.abs() < 0.1, 0.0);
            const auto acc = torch_ext::packed_conv2d(torch_ext::pack_codes(codes, bit),
                                                      torch_ext::pack_binary_weights(weight), c, {stride, stride},
                                                      {padding, padding});
            INFO("isa=" << isa << " k=" << k << " stride=" << stride << " padding=" << padding << " c=" << c);
            CHECK(torch::equal(acc.to(torch::kLong), reference_acc(codes, weight, stride, padding)));
          }
        }
      }
    }
  }
}

TEST_CASE("threshold and affine outputs follow the accumulator", "[packed]") {
  torch::manual_seed(2);
  for (const std::string isa : {"baseline", ""}) {
    IsaCap cap(isa);
    const int64_t c = 70, o = 67;
    const auto codes = torch::randint(0, 4, {2, c, 5, 5}, torch::kUInt8);
    const auto x = torch_ext::pack_codes(codes, 2);
    const auto w = torch_ext::pack_binary_weights(torch::randn({o, c, 3, 3}));
    const auto acc = torch_ext::packed_conv2d(x, w, c, {1, 1}, {1, 1});
    const auto thresholds = std::get<0>(torch::randint(-200, 200, {o, 3}).sort(1)).to(torch::kInt);
    const auto direction = torch::where(torch::rand({o}) < 0.5, 1, -1).to(torch::kInt);
    const auto packed = torch_ext::packed_conv2d_threshold(x, w, c, {1, 1}, {1, 1}, thresholds, direction, 2);
    const auto v = (acc.to(torch::kLong) * direction.view({1, -1, 1, 1})).unsqueeze(-1);
    const auto expected = (v >= thresholds.view({1, o, 1, 1, 3})).sum(-1);
    CHECK(torch::equal(torch_ext::unpack_codes(packed, o).to(torch::kLong), expected));
    const auto scale = torch::randn({o});
    const auto bias = torch::randn({o});
    const auto y = torch_ext::packed_conv2d_affine(x, w, c, {1, 1}, {1, 1}, scale, bias);
    CHECK(torch::equal(y, acc.to(torch::kFloat) * scale.view({1, -1, 1, 1}) + bias.view({1, -1, 1, 1})));
  }
}

TEST_CASE("quantize_pack_codes and packed_space_to_depth", "[packed]") {
  torch::manual_seed(3);
  const auto x = torch::randn({2, 40, 4, 6}) * 2;
  const auto codes = torch::floor(torch::clamp(x, 0.0, 2.0) / 2.0 * 3.0 + 0.5).to(torch::kUInt8);
  const auto packed = torch_ext::quantize_pack_codes(x, 2, 2.0);
  CHECK(torch::equal(torch_ext::unpack_codes(packed, 40), codes));
  const auto s2d = torch_ext::unpack_codes(torch_ext::packed_space_to_depth(packed, 40, 2), 160);
  const auto expected = codes.reshape({2, 40, 2, 2, 3, 2}).permute({0, 3, 5, 1, 2, 4}).reshape({2, 160, 2, 3});
  CHECK(torch::equal(s2d, expected));
}

TEST_CASE("the packed operators refuse bad input with the argument named", "[packed][refused]") {
  const auto codes = torch::randint(0, 4, {1, 70, 4, 4}, torch::kUInt8);
  const auto x = torch_ext::pack_codes(codes, 2);
  const auto w = torch_ext::pack_binary_weights(torch::randn({3, 70, 3, 3}));
  CHECK_THROWS_AS(torch_ext::pack_codes(codes, 5), c10::ValueError);
  CHECK_THROWS_AS(torch_ext::pack_codes(codes.to(torch::kFloat), 2), c10::TypeError);
  CHECK_THROWS_AS(torch_ext::pack_codes(codes + 4, 2), c10::ValueError);
  CHECK_THROWS_AS(torch_ext::unpack_codes(x, 64), c10::ValueError);
  CHECK_THROWS_AS(torch_ext::packed_conv2d(x, w, 64, {1, 1}, {1, 1}), c10::ValueError);
  CHECK_THROWS_AS(torch_ext::packed_conv2d(x, w.to(torch::kInt), 70, {1, 1}, {1, 1}), c10::TypeError);
  CHECK_THROWS_AS(torch_ext::packed_conv2d(x, w, 70, {0, 1}, {1, 1}), c10::ValueError);
  CHECK_THROWS_AS(torch_ext::packed_conv2d(x.narrow(1, 0, 1), w, 70, {1, 1}, {0, 0}), c10::ValueError);
  auto tampered = w.clone();
  tampered.index_put_({0, 0, 0, 1}, int64_t(1) << 62);
  CHECK_THROWS_AS(torch_ext::packed_conv2d(x, tampered, 70, {1, 1}, {1, 1}), c10::ValueError);
  const auto th = torch::zeros({3, 3}, torch::kInt);
  CHECK_THROWS_AS(torch_ext::packed_conv2d_threshold(x, w, 70, {1, 1}, {1, 1}, th, torch::zeros({3}, torch::kInt), 2),
                  c10::ValueError);
  CHECK_THROWS_AS(torch_ext::packed_conv2d_threshold(x, w, 70, {1, 1}, {1, 1}, th, torch::ones({3}, torch::kInt), 1),
                  c10::ValueError);
  CHECK_THROWS_AS(torch_ext::packed_conv2d_affine(x, w, 70, {1, 1}, {1, 1}, torch::ones({2}), torch::ones({3})),
                  c10::ValueError);
  CHECK_THROWS_AS(torch_ext::quantize_pack_codes(torch::ones({1, 2, 2, 2}, torch::kDouble), 2, 2.0), c10::TypeError);
}
