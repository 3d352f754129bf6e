// fasttf.scaled_dot_product_attention's eager call on CPU tensors, or None where the Python path must
// take it (sdpa_fast_path.cpp). Apart from ops.h: its pybind11 types need torch/extension.h, which the
// kernels' files do not include (it costs ~40 s of compile time a file).
#pragma once
#include <torch/extension.h>

namespace fasttf {

py::object native_sdpa_or_none(py::handle query, py::handle key, py::handle value, py::handle attn_mask,
                               py::handle dropout_p, py::handle is_causal, py::handle scale, py::handle enable_gqa);

}  // namespace fasttf
