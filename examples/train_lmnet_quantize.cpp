// A LibTorch user of torch_ext's models: Blueoil's W1A2 LMNet
// (torch_ext::models::LmnetV1Quantize, binary weights and 2-bit activations)
// trained in C++ on synthetic images, saved and reloaded.
//
//   train_lmnet_quantize OUTPUT.pt [STEPS]
//
// The images are 3x32x32 noise with one bright 8x8 square; the class is the
// quadrant the square lies in (4 classes). The program prints the loss,
// saves the model with torch::save, loads it into a fresh model and checks
// that the eval-mode outputs are identical. Exits non-zero if the training
// loss did not fall by a quarter or the reloaded model differs.
#include <torch_ext/models.h>

#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <string>

namespace {

constexpr int64_t kClasses = 4;

torch_ext::models::LmnetV1Quantize make_model() {
  return torch_ext::models::LmnetV1Quantize(torch_ext::models::LmnetV1QuantizeOptions().num_classes(kClasses));
}

// n images [n, 3, 32, 32] and their classes: a square in quadrant `label`.
std::pair<torch::Tensor, torch::Tensor> synthetic_images(int64_t n) {
  auto images = torch::randn({n, 3, 32, 32}) * 0.2;
  auto labels = torch::randint(kClasses, {n}, torch::kLong);
  auto offsets = torch::randint(0, 9, {n, 2}, torch::kLong);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t label = labels[i].item<int64_t>();
    const int64_t top = (label / 2) * 16 + offsets[i][0].item<int64_t>();
    const int64_t left = (label % 2) * 16 + offsets[i][1].item<int64_t>();
    using torch::indexing::Slice;
    images.index_put_({i, Slice(), Slice(top, top + 8), Slice(left, left + 8)}, 1.5);
  }
  return {images, labels};
}

}  // namespace

int main(int argc, char* argv[]) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " OUTPUT.pt [STEPS]\n";
    return 2;
  }
  const std::string output = argv[1];
  const int steps = argc > 2 ? std::atoi(argv[2]) : 30;
  if (steps <= 0) {
    std::cerr << "STEPS must be a positive integer, got " << argv[2] << "\n";
    return 2;
  }
  torch::manual_seed(0);
  auto model = make_model();
  std::cout << model << "\n";
  auto [images, labels] = synthetic_images(64);
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(3e-3));

  // The training loss, averaged over the first and the last few steps (one
  // batch's loss is noisy). It must fall by a quarter at least.
  const int window = std::min(5, steps);
  double first = 0.0, last = 0.0;
  for (int step = 0; step < steps; ++step) {
    const auto batch = torch::randint(images.size(0), {32}, torch::kLong);
    optimizer.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(images.index({batch})), labels.index({batch}));
    loss.backward();
    optimizer.step();
    const double value = loss.item<double>();
    first += step < window ? value / window : 0.0;
    last += step >= steps - window ? value / window : 0.0;
    if (step % 10 == 0 || step == steps - 1) {
      std::cout << "step " << step << " train loss " << value << "\n";
    }
  }
  model->eval();
  const auto accuracy = (model->forward(images).argmax(1) == labels).to(torch::kFloat).mean().item<float>();
  std::cout << "mean train loss of the first " << window << " steps " << first << ", of the last " << window
            << " steps " << last << "; eval accuracy " << accuracy << "\n";

  torch::save(model, output);
  auto loaded = make_model();
  torch::load(loaded, output);
  loaded->eval();
  const bool same = torch::equal(loaded->forward(images), model->forward(images));
  std::cout << "saved to " << output << "; reloaded outputs identical: " << (same ? "yes" : "no") << "\n";
  if (!(last < 0.75 * first) || !same) {
    std::cerr << "FAILED: train loss " << first << " -> " << last << ", reload identical: " << same << "\n";
    return 1;
  }
  return 0;
}
