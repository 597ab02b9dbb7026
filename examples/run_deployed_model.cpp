// A LibTorch user of a deployed (bit-packed) model: runs the AOTInductor
// package (.pt2) that torch_ext.deploy wrote from Python, in C++, where the
// torch_ext operators come from libtorch_ext. A TorchScript file (.pt, the
// route before torch.export) runs too.
//
//   run_deployed_model MODEL.pt2|MODEL.pt [EXPECTED.pt]
//
// Prints the outputs and the time of a forward. With EXPECTED.pt (torch.save
// of a dict written by examples/make_deployed_model.py: images, logits,
// codes) it exits non-zero unless every code equals Python's and the logits
// do too (within docs/deploy.md's tolerance for a package).
#include <torch_ext/packed.h>
#include <torch_ext/torch_ext.h>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The dict that Python's torch.save wrote.
c10::impl::GenericDict load_expected(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toGenericDict();
}

}  // namespace

int main(int argc, char* argv[]) {
  if (argc < 2 || argc > 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2|MODEL.pt [EXPECTED.pt]\n";
    return 2;
  }
  // A call into libtorch_ext keeps it linked (linkers drop unused shared
  // libraries), so that loading it registers the torch_ext operators, which
  // the package and the TorchScript file call by name.
  std::cout << "torch_ext packs " << torch_ext::kPackedWordBits << " channels a word; CUDA kernels: "
            << (torch_ext::built_with_cuda() ? "yes" : "no") << "\n";
  const std::string path = argv[1];
  std::function<std::vector<torch::Tensor>(const torch::Tensor&)> run;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
  torch::jit::Module scripted;
  try {
    if (ends_with(path, ".pt2")) {
      package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
      run = [&package](const torch::Tensor& x) { return package->run({x}); };
    } else {
      scripted = torch::jit::load(path);
      scripted.eval();
      run = [&scripted](const torch::Tensor& x) {
        return std::vector<torch::Tensor>{scripted.forward({x}).toTensor()};
      };
    }
  } catch (const c10::Error& e) {
    std::cerr << "cannot load " << path << ": " << e.what_without_backtrace() << "\n";
    return 1;
  }
  torch::Tensor images = torch::rand({4, 3, 32, 32});
  c10::impl::GenericDict expected(c10::StringType::get(), c10::AnyType::get());
  if (argc == 3) {
    expected = load_expected(argv[2]);
    images = expected.at("images").toTensor();
  }
  torch::NoGradGuard no_grad;
  const std::vector<torch::Tensor> outputs = run(images);
  std::cout << "logits " << outputs.at(0).sizes() << "\n" << outputs.at(0) << "\n";
  for (size_t i = 1; i < outputs.size(); ++i) {
    std::cout << "codes " << i - 1 << ": " << outputs[i].sizes() << " " << outputs[i].dtype() << "\n";
  }
  const auto start = std::chrono::steady_clock::now();
  const int repeats = 20;
  for (int i = 0; i < repeats; ++i) {
    run(images);
  }
  const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
  std::cout << "forward of " << images.size(0) << " images: " << took.count() / repeats << " ms\n";
  if (argc == 3) {
    // The codes are integers: bit for bit. The logits come from float layers
    // that AOTInductor fuses and sums in its own order: the tolerance of
    // docs/deploy.md (a TorchScript file runs eager's kernels: equal).
    const torch::Tensor& want = expected.at("logits").toTensor();
    const bool same_logits = package ? torch::allclose(outputs.at(0), want, 1e-5, 1e-6)
                                     : torch::equal(outputs.at(0), want);
    const auto codes = expected.at("codes").toList();
    bool same_codes = outputs.size() == codes.size() + 1;
    for (size_t i = 0; same_codes && i < codes.size(); ++i) {
      same_codes = torch::equal(outputs[i + 1], codes.get(i).toTensor());
    }
    std::cout << "logits equal Python's" << (package ? " (within 1e-5 relative)" : "") << ": "
              << (same_logits ? "yes" : "no") << "; " << codes.size()
              << " codes equal Python's: " << (same_codes ? "yes" : "no") << "\n";
    if (!same_logits || !same_codes) {
      return 1;
    }
  }
  return 0;
}
