// The extension's kernels, one declaration per device. Bindings live in fasttf.cpp.
#pragma once
#include <torch/extension.h>

namespace fasttf {
namespace cpu {
at::Tensor residual_add(const at::Tensor& x, const at::Tensor& residual);
}  // namespace cpu
}  // namespace fasttf
