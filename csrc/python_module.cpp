// torch_ext._C: loading it registers the operators (the static
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL initialisers of csrc/ops/ and the
// kernel files); the few functions here are what Python
// needs besides torch.ops.torch_ext.
#include "torch_ext/torch_ext.h"

#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

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
      [](double max_value, std::optional<at::ScalarType> dtype, const std::string& op) {
        // With a dtype, also refused where it rounds to 0 or inf in x's compute type.
        HANDLE_TH_ERRORS
        if (dtype.has_value()) {
          torch_ext::check_max_value(max_value, *dtype, op.c_str());
        } else {
          torch_ext::check_max_value(max_value, op.c_str());
        }
        END_HANDLE_TH_ERRORS_PYBIND
      },
      pybind11::arg("max_value"), pybind11::arg("dtype") = pybind11::none(),
      pybind11::arg("op") = "linear_mid_tread_half_quantize");
  m.def(
      "check_backward_arguments",
      [](const at::Tensor& grad_y, const at::Tensor& mask) {
        // The fake backward calls this: the real kernels' own check.
        HANDLE_TH_ERRORS
        torch_ext::check_backward_arguments(grad_y, mask);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      pybind11::arg("grad_y"), pybind11::arg("mask"));
  m.def(
      "check_backward_strides",
      [](const at::Tensor& grad_y, std::vector<int64_t> x_strides) {
        // The fake backward calls this with concrete strides.
        HANDLE_TH_ERRORS
        torch_ext::check_backward_strides(grad_y, x_strides);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      pybind11::arg("grad_y"), pybind11::arg("x_strides"));
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
