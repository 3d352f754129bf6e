// fasttf.scaled_dot_product_attention's eager entry for CPU calls, in C++.
//
// The Python function checks its arguments (with messages naming each one), reads
// FASTTF_CPU_ATTENTION, works out the default scale and calls the C++ kernel: ~8 us of Python a
// call, against the ~7 us the kernel takes for one query over 16 keys (a decode step), where torch's
// whole SDPA call takes ~9 us. This entry does the same for the calls it recognises and returns None
// for every other one -- anything it is unsure of, every error included -- so the Python path still
// decides, raises and words its messages as before:
//
//   query, key, value: CPU tensors of one float dtype, all 4-D (N, H, L, E) or all 3-D (H, L, E),
//       one batch size, key and value heads equal (and query's, or a multiple with enable_gqa),
//       key's head dim query's, value's length key's;
//   attn_mask: None, or a CPU tensor of dtype bool or query's dtype that broadcasts to the scores;
//   dropout_p a float in [0, 1] (or the int 0), is_causal and enable_gqa bools, scale None or a
//   float; FASTTF_CPU_ATTENTION unset or "native".
//
// It then runs what the Python path runs: with dropout, a seed drawn from torch's default CPU
// generator as draw_dropout_seed draws it (the same call of randint, so torch.manual_seed replays
// both alike); native_attention_forward through the dispatcher (autograd included); scale
// 1 / sqrt(E) by default; 3-D inputs as a batch of one.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "checks.h"
#include "ops.h"
#include "sdpa_fast_path.h"

namespace fasttf {
namespace {

// The tensor `object` holds, or nullptr for any other object.
const at::Tensor* tensor_of(PyObject* object) {
  return THPVariable_Check(object) ? &THPVariable_Unpack(object) : nullptr;
}

bool runs_native_kernel() {
  const char* choice = std::getenv("FASTTF_CPU_ATTENTION");  // os.environ's changes reach it (putenv)
  return choice == nullptr || std::strcmp(choice, "native") == 0;
}

}  // namespace

py::object native_sdpa_or_none(py::handle query, py::handle key, py::handle value, py::handle attn_mask,
                               py::handle dropout_p, py::handle is_causal, py::handle scale, py::handle enable_gqa) {
  const py::object none = py::none();
  const at::Tensor* q = tensor_of(query.ptr());
  const at::Tensor* k = tensor_of(key.ptr());
  const at::Tensor* v = tensor_of(value.ptr());
  if (q == nullptr || k == nullptr || v == nullptr) return none;
  const at::Tensor* mask = nullptr;
  if (!attn_mask.is_none() && (mask = tensor_of(attn_mask.ptr())) == nullptr) return none;
  // scalars of the exact types the Python path turns into the same values
  int overflow = 0;
  double p = 0.0;
  if (PyFloat_Check(dropout_p.ptr())) {
    p = PyFloat_AS_DOUBLE(dropout_p.ptr());
  } else if (!PyLong_CheckExact(dropout_p.ptr()) || PyLong_AsLongAndOverflow(dropout_p.ptr(), &overflow) != 0 ||
             overflow != 0) {
    return none;
  }
  if (!(p >= 0.0 && p <= 1.0)) return none;  // NaN too
  if (!PyBool_Check(is_causal.ptr()) || !PyBool_Check(enable_gqa.ptr())) return none;
  if (!scale.is_none() && !PyFloat_Check(scale.ptr())) return none;
  if (!runs_native_kernel()) return none;

  const auto dtype = q->scalar_type();
  if (!q->is_cpu() || !k->is_cpu() || !v->is_cpu() || !is_kernel_float(dtype) || k->scalar_type() != dtype ||
      v->scalar_type() != dtype) {
    return none;
  }
  const int64_t rank = q->dim();
  if ((rank != 3 && rank != 4) || k->dim() != rank || v->dim() != rank) return none;
  const auto qs = q->sizes(), ks = k->sizes(), vs = v->sizes();
  if (rank == 4 && (ks[0] != qs[0] || vs[0] != qs[0])) return none;
  const int64_t heads = qs[rank - 3], heads_kv = ks[rank - 3];
  if (vs[rank - 3] != heads_kv || heads_kv <= 0) return none;
  if (enable_gqa.ptr() == Py_True ? heads % heads_kv != 0 : heads != heads_kv) return none;
  if (ks[rank - 1] != qs[rank - 1] || vs[rank - 2] != ks[rank - 2]) return none;
  if (mask != nullptr) {
    if (!mask->is_cpu() || (mask->scalar_type() != at::kBool && mask->scalar_type() != dtype)) return none;
    int64_t scores[4];
    for (int64_t d = 0; d < rank - 1; ++d) scores[d] = qs[d];
    scores[rank - 1] = ks[rank - 2];
    if (!broadcasts_to(mask->sizes(), at::IntArrayRef(scores, rank))) return none;
  }

  const double softmax_scale =
      scale.is_none() ? 1.0 / std::sqrt(static_cast<double>(qs[rank - 1])) : PyFloat_AS_DOUBLE(scale.ptr());
  const bool causal = is_causal.ptr() == Py_True;
  static const auto op = dispatcher_op<decltype(cpu::native_attention_forward)>("fasttf::native_attention_forward");
  const OptTensor mask_arg = mask != nullptr ? OptTensor(*mask) : OptTensor();
  OptTensor seed;
  if (p > 0.0) seed = at::randint(0, int64_t(1) << 62, {1}, at::TensorOptions().dtype(at::kLong).device(q->device()));
  if (rank == 4) return py::cast(std::get<0>(op.call(*q, *k, *v, mask_arg, p, causal, softmax_scale, seed)));
  const auto out = std::get<0>(op.call(q->unsqueeze(0), k->unsqueeze(0), v->unsqueeze(0), mask_arg, p, causal,
                                       softmax_scale, seed));
  return py::cast(out.squeeze(0));
}

}  // namespace fasttf
