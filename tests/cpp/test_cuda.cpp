// CUDA kernels against the CPU kernels, bit for bit. The main returns 77,
// which ctest reports as skipped, when no GPU is visible.
#define CATCH_CONFIG_RUNNER

#include <torch_ext/torch_ext.h>

#include <torch/torch.h>
// torch's logging defines a CHECK of its own: Catch2's must be the one the tests use.
#undef CHECK
#include "catch_compat.h"

#include <iostream>

namespace {

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  const auto ints = a.element_size() == 8 ? at::kLong : (a.element_size() == 4 ? at::kInt : at::kShort);
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
      at::equal(a.contiguous().view(ints), b.contiguous().view(ints));
}

}  // namespace

TEST_CASE("CUDA forward and backward are bit-identical to the CPU", "[cuda]") {
  REQUIRE(torch_ext::built_with_cuda());
  torch::manual_seed(0);
  for (auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    for (int bit : {1, 2, 4, 8, 16, 32}) {
      for (int64_t n : {1, 7, 8, 9, 1000, 100003}) {
        auto x = (torch::rand({n}, at::kDouble) * 3.0 - 0.5).to(dtype);
        auto [y_cpu, m_cpu] = torch_ext::linear_mid_tread_half_quantize_forward(x, bit, 2.0);
        auto [y_gpu, m_gpu] = torch_ext::linear_mid_tread_half_quantize_forward(x.cuda(), bit, 2.0);
        INFO("dtype=" << dtype << " bit=" << bit << " n=" << n);
        CHECK(same_bits(y_cpu, y_gpu.cpu()));
        CHECK(at::equal(m_cpu, m_gpu.cpu()));
        auto g = torch::randn({n}).to(dtype);
        CHECK(same_bits(
            torch_ext::linear_mid_tread_half_quantize_backward(g, m_cpu),
            torch_ext::linear_mid_tread_half_quantize_backward(g.cuda(), m_gpu).cpu()));
      }
    }
  }
}

TEST_CASE("CUDA handles channels_last and strided inputs", "[cuda]") {
  auto x = torch::randn({3, 8, 5, 7}) * 2.0;
  auto expected = torch_ext::linear_mid_tread_half_quantize(x, 3, 2.0);
  auto cl = x.cuda().contiguous(at::MemoryFormat::ChannelsLast);
  auto y = torch_ext::linear_mid_tread_half_quantize(cl, 3, 2.0);
  CHECK(y.is_contiguous(at::MemoryFormat::ChannelsLast));
  CHECK(same_bits(y.cpu(), expected));
  auto t = x.cuda().transpose(0, 2);
  CHECK(same_bits(torch_ext::linear_mid_tread_half_quantize(t, 3, 2.0).cpu(), expected.transpose(0, 2)));
}

int main(int argc, char* argv[]) {
  if (!torch::cuda::is_available()) {
    std::cout << "no CUDA device visible: the CUDA tests are skipped\n";
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
