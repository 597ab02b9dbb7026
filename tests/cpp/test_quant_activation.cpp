// The LibTorch module torch_ext::QuantActivation.

#include <torch_ext/quant_activation.h>

#include <torch/torch.h>
// torch's logging defines a CHECK of its own: Catch2's must be the one the tests use.
#undef CHECK
#include "catch_compat.h"

#include <sstream>

TEST_CASE("QuantActivation has Blueoil's defaults and prints them", "[module]") {
  torch_ext::QuantActivation q;
  CHECK(q->options.bit() == 2);
  CHECK(q->options.max_value() == 2.0);
  std::ostringstream text;
  text << *q;
  CHECK(text.str() == "torch_ext::QuantActivation(bit=2, max_value=2)");
}

TEST_CASE("QuantActivation computes the operator and trains inside a Sequential", "[module]") {
  torch::manual_seed(0);
  torch::nn::Sequential net(
      torch::nn::Linear(4, 8), torch_ext::QuantActivation(torch_ext::QuantActivationOptions(2, 2.0)),
      torch::nn::Linear(8, 1));
  auto x = torch::randn({64, 4});
  auto target = x.sum(1, true);
  torch::optim::SGD opt(net->parameters(), 0.05);
  float first = 0.0f;
  float last = 0.0f;
  for (int step = 0; step < 60; ++step) {
    opt.zero_grad();
    auto loss = torch::mse_loss(net->forward(x), target);
    loss.backward();
    opt.step();
    if (step == 0) {
      first = loss.item<float>();
    }
    last = loss.item<float>();
  }
  CHECK(last < 0.5f * first);
}

TEST_CASE("QuantActivation refuses bad options when built", "[module][refused]") {
  CHECK_THROWS_AS(torch_ext::QuantActivation(torch_ext::QuantActivationOptions(0, 2.0)), c10::ValueError);
  CHECK_THROWS_AS(torch_ext::QuantActivation(torch_ext::QuantActivationOptions(2, -1.0)), c10::ValueError);
}

TEST_CASE("QuantActivation inplace overwrites its input", "[module][inplace]") {
  torch_ext::QuantActivation q(torch_ext::QuantActivationOptions(1, 2.0).inplace(true));
  auto x = torch::tensor({0.2f, 1.5f});
  auto y = q(x);
  CHECK(y.data_ptr() == x.data_ptr());
  CHECK(x[0].item<float>() == 0.0f);
  CHECK(x[1].item<float>() == 2.0f);
}
