// fasttf._C: pybind11 bindings and the TORCH_LIBRARY registrations of the extension's ops.
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY(fasttf, m) {
  m.def("residual_add(Tensor x, Tensor residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(fasttf, CPU, m) {
  m.impl("residual_add", &fasttf::cpu::residual_add);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasttf's C++/CUDA kernels; the ops are also registered as torch.ops.fasttf.*";
#ifdef FASTTF_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
