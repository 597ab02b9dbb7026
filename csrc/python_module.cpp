// torch_ext._C: loading it registers the operators (static TORCH_LIBRARY
// initialisers of the other files); the few functions here are what Python
// needs besides torch.ops.torch_ext.
#include "torch_ext/torch_ext.h"

#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torch_ext: Blueoil's linear mid-tread half quantizer as PyTorch operators";
  m.def(
      "check_quantize_arguments",
      [](at::ScalarType dtype, int64_t bit, double max_value) {
        // The fake kernels call this, so that tracing refuses exactly what the
        // real kernels refuse, with the same exception types and messages.
        HANDLE_TH_ERRORS
        torch_ext::check_quantize_arguments(dtype, bit, max_value);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      pybind11::arg("dtype"), pybind11::arg("bit"), pybind11::arg("max_value"));
  m.def(
      "check_bit",
      [](int64_t bit) {
        HANDLE_TH_ERRORS
        torch_ext::check_bit(bit);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      pybind11::arg("bit"));
  m.def(
      "check_max_value",
      [](double max_value) {
        HANDLE_TH_ERRORS
        torch_ext::check_max_value(max_value);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      pybind11::arg("max_value"));
  m.def(
      "check_inplace_allowed",
      [](const at::Tensor& x) {
        HANDLE_TH_ERRORS
        torch_ext::check_inplace_allowed(x);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      pybind11::arg("x"));
  m.def("built_with_cuda", &torch_ext::built_with_cuda, "Whether CUDA kernels were compiled and registered.");
}
