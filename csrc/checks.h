// Argument checks shared by every op: each failure names the op, the argument and what was expected.
//
// Numbers in the messages are written by the *_str helpers (std::to_string, snprintf), never
// inserted into a std::ostream by this library: on one CUDA machine (torch 2.11+cu130, the
// extension built there) every message with a number streamed from here crashed the process with
// a segfault instead of raising, while the same messages without numbers raised as they should.
#pragma once
#include <ATen/ATen.h>

#include <cstdio>
#include <string>

namespace fasttf {

inline std::string int_str(int64_t value) { return std::to_string(value); }

inline std::string float_str(double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", value);
  return text;
}

inline std::string bool_str(bool value) { return value ? "True" : "False"; }

// [2, 3, 4], as torch prints a shape.
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(sizes[i]);
  }
  return text + "]";
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name,
                              const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "fasttf.", op, ": expected all tensors on one device, but ", a_name,
              " is on ", a.device().str(), " and ", b_name, " is on ", b.device().str());
}

inline void check_same_dtype(const char* op, const at::Tensor& a, const char* a_name,
                             const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fasttf.", op, ": expected ", b_name,
              " to have the dtype of ", a_name, " (", a.scalar_type(), "), got ", b.scalar_type());
}

inline void check_same_shape(const char* op, const at::Tensor& a, const char* a_name,
                             const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.sizes() == b.sizes(), "fasttf.", op, ": expected ", b_name, " to have the shape of ",
              a_name, " ", shape_str(a.sizes()), ", got ", shape_str(b.sizes()));
}

// The dtypes the kernels take.
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_floating(const char* op, const at::Tensor& a, const char* a_name) {
  const auto t = a.scalar_type();
  TORCH_CHECK(is_kernel_float(t), "fasttf.", op, ": expected ", a_name,
              " to be float32, float64, float16 or bfloat16, got ", t);
}

// Whether a tensor of `sizes` broadcasts to `target` (each trailing size equal or 1).
inline bool broadcasts_to(at::IntArrayRef sizes, at::IntArrayRef target) {
  if (sizes.size() > target.size()) return false;
  for (size_t d = 1; d <= sizes.size(); ++d) {
    const int64_t size = sizes[sizes.size() - d];
    if (size != 1 && size != target[target.size() - d]) return false;
  }
  return true;
}

}  // namespace fasttf
