// A LibTorch user of torch_ext: a small classifier with QuantActivation
// layers, trained for a few steps in C++ and saved.
//
//   train_quant_mlp OUTPUT.pt [STEPS]
//
// It learns a toy task (is the sum of 8 inputs positive?), prints the loss,
// checks that it went down, and saves the module with torch::save. Exits
// non-zero if training did not lower the loss or the saved model does not
// load back with the same outputs.
#include <torch_ext/quant_activation.h>

#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <string>

namespace {

torch::nn::Sequential make_model() {
  return torch::nn::Sequential(
      torch::nn::Linear(8, 32), torch_ext::QuantActivation(torch_ext::QuantActivationOptions(2, 2.0)),
      torch::nn::Linear(32, 32), torch_ext::QuantActivation(torch_ext::QuantActivationOptions(2, 2.0)),
      torch::nn::Linear(32, 2));
}

}  // namespace

int main(int argc, char* argv[]) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " OUTPUT.pt [STEPS]\n";
    return 2;
  }
  const std::string output = argv[1];
  const int steps = argc > 2 ? std::atoi(argv[2]) : 200;
  if (steps <= 0) {
    std::cerr << "STEPS must be a positive integer, got " << argv[2] << "\n";
    return 2;
  }
  torch::manual_seed(0);
  auto model = make_model();
  std::cout << model << "\n";
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  const auto x = torch::randn({512, 8});
  const auto target = (x.sum(1) > 0).to(torch::kLong);
  float first = 0.0f;
  float last = 0.0f;
  for (int step = 0; step < steps; ++step) {
    optimizer.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), target);
    loss.backward();
    optimizer.step();
    last = loss.item<float>();
    if (step == 0) {
      first = last;
    }
    if (step % 50 == 0 || step == steps - 1) {
      std::cout << "step " << step << " loss " << last << "\n";
    }
  }
  model->eval();
  const auto accuracy = (model->forward(x).argmax(1) == target).to(torch::kFloat).mean().item<float>();
  std::cout << "train accuracy " << accuracy << "\n";
  torch::save(model, output);

  auto loaded = make_model();
  torch::load(loaded, output);
  loaded->eval();
  const bool same = torch::equal(loaded->forward(x), model->forward(x));
  std::cout << "saved to " << output << "; reloaded outputs identical: " << (same ? "yes" : "no") << "\n";
  if (!(last < 0.5f * first) || !same) {
    std::cerr << "FAILED: loss " << first << " -> " << last << ", reload identical: " << same << "\n";
    return 1;
  }
  return 0;
}
