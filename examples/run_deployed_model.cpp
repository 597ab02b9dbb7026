// A LibTorch user of a deployed (bit-packed) model: loads the TorchScript
// file that torch_ext.deploy saved from Python and runs it in C++, where the
// torch_ext operators come from libtorch_ext.
//
//   run_deployed_model MODEL.pt [EXPECTED.pt]
//
// Prints the logits and the codes() keys, and the time of a forward. With
// EXPECTED.pt (written by examples/make_deployed_model.py) it exits non-zero
// unless the logits and conv3's codes equal what Python computed.
#include <torch_ext/packed.h>
#include <torch_ext/torch_ext.h>

#include <torch/script.h>
#include <torch/torch.h>

#include <chrono>
#include <iostream>
#include <string>

int main(int argc, char* argv[]) {
  if (argc < 2 || argc > 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt [EXPECTED.pt]\n";
    return 2;
  }
  // A call into libtorch_ext keeps it linked (linkers drop unused shared
  // libraries), so that loading it registers the torch_ext operators.
  std::cout << "torch_ext packs " << torch_ext::kPackedWordBits << " channels a word; CUDA kernels: "
            << (torch_ext::built_with_cuda() ? "yes" : "no") << "\n";
  torch::jit::Module model;
  try {
    model = torch::jit::load(argv[1]);
  } catch (const c10::Error& e) {
    std::cerr << "cannot load " << argv[1] << ": " << e.what_without_backtrace() << "\n";
    return 1;
  }
  model.eval();
  torch::Tensor images = torch::rand({4, 3, 32, 32});
  torch::jit::Module expected;
  if (argc == 3) {
    expected = torch::jit::load(argv[2]);
    images = expected.attr("images").toTensor();
  }
  torch::NoGradGuard no_grad;
  const auto logits = model.forward({images}).toTensor();
  std::cout << "logits " << logits.sizes() << "\n" << logits << "\n";
  // A deployed model also gives its codes; a scripted training model (torch.jit.script of
  // LmnetV1Quantize, saved from Python) has only forward.
  const bool deployed = model.find_method("codes").has_value();
  c10::impl::GenericDict codes(c10::StringType::get(), c10::TensorType::get());
  if (deployed) {
    codes = model.get_method("codes")({images}).toGenericDict();
    for (const auto& item : codes) {
      std::cout << "codes[" << item.key().toStringRef() << "] " << item.value().toTensor().sizes() << "\n";
    }
  }
  const auto start = std::chrono::steady_clock::now();
  const int repeats = 20;
  for (int i = 0; i < repeats; ++i) {
    model.forward({images});
  }
  const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
  std::cout << "forward of " << images.size(0) << " images: " << took.count() / repeats << " ms\n";
  if (argc == 3) {
    const bool same_logits = torch::equal(logits, expected.attr("logits").toTensor());
    const bool same_codes =
        !deployed || torch::equal(codes.at("conv3.act").toTensor(), expected.attr("conv3_codes").toTensor());
    std::cout << "logits equal Python's: " << (same_logits ? "yes" : "no") << "; conv3 codes equal: "
              << (same_codes ? "yes" : "no") << "\n";
    if (!same_logits || !same_codes) {
      return 1;
    }
  }
  return 0;
}
