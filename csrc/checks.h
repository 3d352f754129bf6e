// Argument checks shared by every op: each failure names the op, the argument and what was expected.
#pragma once
#include <torch/extension.h>

namespace fasttf {

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name,
                              const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "fasttf.", op, ": expected ", b_name, " on the same device as ",
              a_name, " (", a.device(), "), got ", b.device());
}

inline void check_same_dtype(const char* op, const at::Tensor& a, const char* a_name,
                             const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fasttf.", op, ": expected ", b_name,
              " to have the dtype of ", a_name, " (", a.scalar_type(), "), got ", b.scalar_type());
}

inline void check_same_shape(const char* op, const at::Tensor& a, const char* a_name,
                             const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.sizes() == b.sizes(), "fasttf.", op, ": expected ", b_name, " to have the shape of ",
              a_name, " ", a.sizes(), ", got ", b.sizes());
}

inline void check_floating(const char* op, const at::Tensor& a, const char* a_name) {
  const auto t = a.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, "fasttf.", op,
              ": expected ", a_name, " to be float32, float64, float16 or bfloat16, got ", t);
}

}  // namespace fasttf
