// The CPU attention kernels' inputs: argument checks, the operands in the accumulation type, the
// mask's broadcast view, the dropout parameters, and the BLAS block product.
#include <cmath>

#include "../checks.h"
#include "../philox.h"
#include "attention.h"
#include "simd.h"

namespace fasttf {
namespace cpu {
namespace attention {

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& attn_mask, double dropout_p,
                  const std::optional<at::Tensor>& seed) {
  check_floating(op, q, "query");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fasttf.", op,
              ": expected 4-D query, key and value (N, H, L, E), got ", shape_str(q.sizes()), ", ",
              shape_str(k.sizes()), ", ", shape_str(v.sizes()));
  check_same_device(op, q, "query", k, "key");
  check_same_device(op, q, "query", v, "value");
  check_same_dtype(op, q, "query", k, "key");
  check_same_dtype(op, q, "query", v, "value");
  TORCH_CHECK(q.device().is_cpu(), "fasttf.", op, ": expected CPU tensors, got ", q.device().str());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "fasttf.", op, ": expected one batch size, got ",
              "query ", int_str(q.size(0)), ", key ", int_str(k.size(0)), ", value ", int_str(v.size(0)));
  TORCH_CHECK(v.size(1) == k.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0, "fasttf.", op,
              ": expected key and value heads equal and dividing query's heads, got query ", int_str(q.size(1)),
              ", key ", int_str(k.size(1)), ", value ", int_str(v.size(1)));
  TORCH_CHECK(k.size(3) == q.size(3), "fasttf.", op, ": expected key's head dim ", int_str(k.size(3)),
              " to equal query's ", int_str(q.size(3)));
  TORCH_CHECK(v.size(2) == k.size(2), "fasttf.", op, ": expected value's length ", int_str(v.size(2)),
              " to equal key's ", int_str(k.size(2)));
  if (attn_mask.has_value() && attn_mask->defined()) {
    const auto& m = *attn_mask;
    check_same_device(op, q, "query", m, "attn_mask");
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(), "fasttf.", op,
                ": expected attn_mask of dtype bool or query's dtype ", q.scalar_type(), ", got ", m.scalar_type());
    TORCH_CHECK(m.dim() <= 4, "fasttf.", op, ": attn_mask of shape ", shape_str(m.sizes()),
                " does not broadcast to the scores");
    const int64_t full[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
    TORCH_CHECK(broadcasts_to(m.sizes(), at::IntArrayRef(full, 4)), "fasttf.", op, ": attn_mask of shape ",
                shape_str(m.sizes()), " does not broadcast to the scores' shape ", shape_str(at::IntArrayRef(full, 4)));
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "fasttf.", op, ": expected dropout_p in [0, 1], got ",
              float_str(dropout_p));
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined() && seed->numel() == 1 && seed->scalar_type() == at::kLong,
                "fasttf.", op, ": dropout_p > 0 needs a seed (an int64 tensor of one element)");
  }
}

bool bf16_products() {
#if defined(__x86_64__)
  // MKL's bfloat16 product, a CPU with AVX512-BF16 (AMX-BF16 CPUs have it), FASTTF_CPU_ISA not below avx512
  static const bool yes = gemm_bf16bf16f32_ != nullptr && has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

at::ScalarType operand_type(at::ScalarType dtype) {
  if (dtype == at::kDouble) return at::kDouble;
  return dtype == at::kBFloat16 && bf16_products() ? at::kBFloat16 : at::kFloat;
}

at::Tensor as_kernel_operand(const at::Tensor& t) {
  const auto type = operand_type(t.scalar_type());
  // BLAS reads rows at a unit stride, one row every stride(-2) >= size(-1) elements.
  const bool blas_ok = (t.stride(-1) == 1 || t.size(-1) <= 1) && t.stride(-2) >= std::max<int64_t>(t.size(-1), 1);
  if (t.scalar_type() == type && blas_ok) return t;
  return t.to(type).contiguous();
}

DropoutSpec dropout_spec(double dropout_p, const std::optional<at::Tensor>& seed) {
  DropoutSpec d;
  if (dropout_p <= 0.0) return d;
  d.on = true;
  d.seed = static_cast<uint64_t>(seed->item<int64_t>());
  d.threshold = dropout_threshold(dropout_p);
  d.scale = dropout_p >= 1.0 ? 0.0 : 1.0 / (1.0 - dropout_p);
  return d;
}

MaskView mask_view(const std::optional<at::Tensor>& attn_mask, const at::Tensor& q, int64_t S) {
  MaskView m;
  if (!attn_mask.has_value() || !attn_mask->defined()) return m;
  const auto expanded = attn_mask->expand({q.size(0), q.size(1), q.size(2), S});  // a view: stride 0 on broadcast
  m.kind = attn_mask->scalar_type() == at::kBool ? MaskView::kBool : MaskView::kFloat;
  m.dtype = attn_mask->scalar_type();
  m.data = attn_mask->data_ptr();
  m.sb = expanded.stride(0), m.sh = expanded.stride(1), m.sl = expanded.stride(2), m.ss = expanded.stride(3);
  return m;
}

template <typename acc_t, typename in_t>
Problem<acc_t, in_t> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                                  double scale, const std::optional<at::Tensor>& seed) {
  Problem<acc_t, in_t> p;
  p.N = q.size(0), p.H = q.size(1), p.Hkv = k.size(1), p.L = q.size(2), p.S = k.size(2);
  p.E = q.size(3), p.Ev = v.size(3);
  p.group = p.H / p.Hkv;
  p.q = q.data_ptr<in_t>(), p.k = k.data_ptr<in_t>(), p.v = v.data_ptr<in_t>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.scale = static_cast<acc_t>(scale);
  p.causal = is_causal;
  p.mask = mask_view(attn_mask, q, p.S);
  p.dropout = dropout_spec(dropout_p, seed);
  return p;
}

template Problem<float> make_problem<float>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, double, bool, double,
                                            const std::optional<at::Tensor>&);
template Problem<double> make_problem<double>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const std::optional<at::Tensor>&, double, bool, double,
                                              const std::optional<at::Tensor>&);
template Problem<float, at::BFloat16> make_problem<float, at::BFloat16>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, bool, double,
    const std::optional<at::Tensor>&);

// Row-major C = alpha op(A) op(B) + beta C is column-major C^T = alpha op(B)^T op(A)^T + beta C^T:
// the same call with the operands swapped. The BLAS is the one torch's CPU build carries (MKL on
// x86: sgemm_/dgemm_ exported by libtorch_cpu).
template <typename acc_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a, int64_t lda,
          const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ila = static_cast<int>(std::max<int64_t>(ldb, 1)), ilb = static_cast<int>(std::max<int64_t>(lda, 1));
  const int ilc = static_cast<int>(std::max<int64_t>(ldc, 1));
  if constexpr (std::is_same_v<acc_t, float>) {
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ila, a, &ilb, &beta, c, &ilc);
  } else {
    dgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ila, a, &ilb, &beta, c, &ilc);
  }
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                          int64_t, float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                           int64_t, double, double*, int64_t);

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const at::BFloat16* a,
          int64_t lda, const at::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  TORCH_INTERNAL_ASSERT(gemm_bf16bf16f32_ != nullptr, "fasttf: MKL's gemm_bf16bf16f32 is not in this torch");
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ila = static_cast<int>(std::max<int64_t>(ldb, 1)), ilb = static_cast<int>(std::max<int64_t>(lda, 1));
  const int ilc = static_cast<int>(std::max<int64_t>(ldc, 1));
  gemm_bf16bf16f32_(&ta, &tb, &im, &in, &ik, &alpha, reinterpret_cast<const uint16_t*>(b), &ila,
                    reinterpret_cast<const uint16_t*>(a), &ilb, &beta, c, &ilc);
}

}  // namespace attention
}  // namespace cpu
}  // namespace fasttf
