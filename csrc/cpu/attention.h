// fasttf's flash-style attention on the CPU: the shared view of the inputs and the helpers the
// forward, backward and weights kernels use.
//
// The math, once (per batch b, head h, query row i, key j; g(h) = h / (H / Hkv) is the key/value
// head of a query head under grouped-query attention):
//
//   s_ij  = scale * q_i . k_j + bias_ij        bias: the float mask, or 0 / -inf for a bool mask;
//                                              -inf where is_causal and j > i (top-left aligned)
//   lse_i = log sum_j exp(s_ij)               (+inf for a row with every key masked)
//   p_ij  = exp(s_ij - lse_i)                 (0 for such a row: output 0, gradients 0)
//   z_ij  = keep_ij / (1 - p_drop)            keep_ij = Philox(seed, ((b H + h) L + i) S + j) >= p_drop
//   o_i   = sum_j p_ij z_ij v_j
//
//   backward, with W = p z (the weights the attention returns) and dW their incoming gradient:
//   dP'_ij = dO_i . v_j + dW_ij               (the gradient of p_ij z_ij)
//   dp_ij  = dP'_ij z_ij
//   D_i    = sum_j p_ij dp_ij = dO_i . o_i + sum_j W_ij dW_ij
//   ds_ij  = p_ij (dp_ij - D_i)               (= d bias_ij: the float mask's gradient)
//   dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij z_ij dO_i
//
// The forward streams key blocks with an online softmax (running max m and sum l per row, the
// output rescaled by exp(m_old - m_new)), saves lse = m + log l, and never holds more than one
// (query block x key block) tile of scores. The backward recomputes p from lse tile by tile.
// Block products run on the BLAS (MKL's sgemm / dgemm, which torch's x86 build exports), the row
// passes in attention_rows.cpp (omp simd, compiled per x86 level).
//
// bfloat16 inputs on a CPU with bfloat16 dot products (AVX512-BF16, AMX-BF16) stay bfloat16 in the
// block products (MKL's gemm_bf16bf16f32: bfloat16 operands, float32 sums, AMX tiles where the
// CPU has them), as torch's CPU flash kernel and GPU flash attention do: scores, softmax, lse,
// dropout and the output's sum stay float32, and the operands made in the kernel, p z for
// (p z) V and (p z)^T dO and ds for ds K and ds^T Q, are rounded to bfloat16 first. Elsewhere
// (and with FASTTF_CPU_ISA below avx512) bfloat16 inputs are converted to float32 and take the
// float32 products.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>

// The Fortran BLAS that libtorch_cpu exports (MKL in torch's x86 builds), and MKL's per-thread
// thread count: tiles are multiplied on the calling thread only, so results never depend on how
// many threads MKL would have used.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));  // MKL only
// MKL only: row-major-agnostic like sgemm_, with bfloat16 a and b (their bits), float32 c
void gemm_bf16bf16f32_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const uint16_t* a, const int* lda, const uint16_t* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace fasttf {
namespace cpu {
namespace attention {

// For the life of a task: the BLAS on this thread alone.
struct SingleThreadBlas {
  int previous = 0;
  SingleThreadBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
};

// Tiles: query rows x keys per block product. Large tiles feed the BLAS better (it packs each key
// block once per tile); causal attention wants short query blocks, since a tile crossing the
// diagonal computes scores it then masks (a fraction of about block_m / L of the work), so they
// grow with L only past 2048. Measured
// at (N, H, L, E) = (2, 8, 256..4096, 64), float32, one thread (Xeon, AVX-512, MKL).
struct Tiles {
  int64_t m, n;
};
inline Tiles causal_tiles(int64_t L) { return L >= 2048 ? Tiles{128, 512} : Tiles{64, 256}; }
inline Tiles forward_tiles(bool causal, int64_t L) { return causal ? causal_tiles(L) : Tiles{256, 512}; }
inline Tiles backward_tiles(bool causal, int64_t L) { return causal ? causal_tiles(L) : Tiles{128, 512}; }
constexpr int64_t kBlockM = 64;   // the weights kernel's tiles
constexpr int64_t kBlockN = 256;

// The mask as its caller gave it, read through the (N, H, L, S) strides of its expanded view
// (stride 0 along broadcast dims): never copied.
struct MaskView {
  enum Kind { kNone, kBool, kFloat } kind = kNone;
  at::ScalarType dtype = at::kFloat;
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, sl = 0, ss = 0;
};

// Dropout: z = keep ? scale : 0 from the Philox word of each element's flat (N, H, L, S) index.
struct DropoutSpec {
  bool on = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double scale = 1.0;
};

// q, k, v as the block products read them (in_t: the accumulation type acc_t -- float, or double
// for float64 inputs -- or at::BFloat16 on the bfloat16 products), each with a unit stride along
// its last dim; the strides are in elements.
template <typename acc_t, typename in_t = acc_t>
struct Problem {
  using operand_t = in_t;
  int64_t N, H, Hkv, group, L, S, E, Ev;
  const in_t *q, *k, *v;
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;
  acc_t scale;
  bool causal;
  MaskView mask;
  DropoutSpec dropout;

  const in_t* q_row(int64_t b, int64_t h, int64_t i) const { return q + b * q_sb + h * q_sh + i * q_sl; }
  const in_t* k_row(int64_t b, int64_t hk, int64_t j) const { return k + b * k_sb + hk * k_sh + j * k_sl; }
  const in_t* v_row(int64_t b, int64_t hk, int64_t j) const { return v + b * v_sb + hk * v_sh + j * v_sl; }
  int64_t flat(int64_t b, int64_t h, int64_t i, int64_t j) const { return ((b * H + h) * L + i) * S + j; }
  // The last key a query row of [i0, i1) may see, plus one (is_causal: keys j <= i).
  int64_t key_end(int64_t i1) const { return causal ? std::min(S, i1) : S; }
  // The first row of [i0, i1) that sees any key of a block starting at j0.
  int64_t row_start(int64_t i0, int64_t j0) const { return causal ? std::max(i0, j0) : i0; }
};

// Whether bfloat16 inputs take the bfloat16 block products (see the top of this file).
bool bf16_products();
// The type the block products read a tensor of this dtype in: bfloat16 where bf16_products(),
// else the accumulation type (float32, float64 for float64).
at::ScalarType operand_type(at::ScalarType dtype);

// Tensors of the inputs in operand_type, a unit last stride; a view of the input when it already
// is one, else a converted copy (q, k, v are O(L E), small next to the O(L S) work).
at::Tensor as_kernel_operand(const at::Tensor& t);

// The problem over operands made by as_kernel_operand (which must outlive it).
template <typename acc_t, typename in_t = acc_t>
Problem<acc_t, in_t> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                            double scale, const std::optional<at::Tensor>& seed);

// Argument checks naming the op and the argument (RuntimeError, like torch's SDPA).
void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& attn_mask, double dropout_p,
                  const std::optional<at::Tensor>& seed);
DropoutSpec dropout_spec(double dropout_p, const std::optional<at::Tensor>& seed);
MaskView mask_view(const std::optional<at::Tensor>& attn_mask, const at::Tensor& q, int64_t S);

// ---- row passes (attention_rows.cpp) ----

// row[j] += bias(i, j0 + j) for j < n (mask), and -inf for keys past the diagonal (causal).
template <typename acc_t>
void add_bias(acc_t* row, int64_t n, const MaskView& mask, int64_t b, int64_t h, int64_t i, int64_t j0,
              bool causal);
// sum over j < n of a[j] b[j] (float: eight partial sums, added pairwise at the end)
float row_dot(const float* a, const float* b, int64_t n);
double row_dot(const double* a, const double* b, int64_t n);
// sum[j] += part[j] in float64, then part[j] = 0 (dK and dV over many query blocks: wide_kv)
void flush_wide(float* part, double* sum, int64_t n);
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);
// x = exp(x - m) (0 where x = -inf); returns the sum.
float exp_shift_sum(float* x, int64_t n, float m);
// The same, the exps rounded to bfloat16 into out (x untouched), their unrounded sum returned;
// only where bf16_products().
float exp_shift_sum(const float* x, int64_t n, float m, at::BFloat16* out);
double exp_shift_sum(double* x, int64_t n, double m);
// z[j] = keep(seed, start + j) ? scale : 0.
void dropout_row(const DropoutSpec& d, int64_t start, int64_t n, float* z);
void dropout_row(const DropoutSpec& d, int64_t start, int64_t n, double* z);
void keep_row(const DropoutSpec& d, int64_t start, int64_t n, bool* keep);
// row[j] *= z[j] (z: n values of scratch, used where the multipliers go through a buffer).
void apply_dropout(const DropoutSpec& d, int64_t start, int64_t n, float* row, float* z);
void apply_dropout(const DropoutSpec& d, int64_t start, int64_t n, double* row, double* z);

// The backward's row of ds = dL/dscores, from p and dp = dO V^T (+ dW) in place:
//   without dropout  dp[j] = p[j] (dp[j] - d)
//   with dropout     pz[j] = p[j] z[j],  dp[j] = p[j] (dp[j] z[j] - d)   (z of elements start + j,
//                    in registers for float; z: n values of scratch for double)
void softmax_grad_row(const float* p, float* dp, float d, int64_t n);
void softmax_grad_row(const double* p, double* dp, double d, int64_t n);
void softmax_grad_row_dropout(const DropoutSpec& dropout, int64_t start, const float* p, float* pz, float* dp, float d,
                              int64_t n, float* z);
void softmax_grad_row_dropout(const DropoutSpec& dropout, int64_t start, const double* p, double* pz, double* dp,
                              double d, int64_t n, double* z);

// n values of scratch left uninitialised (tiles that a block product writes before any read:
// zeroing them cost a pass over up to 512 KiB a call), 64-byte aligned so that a tile row starts a
// cache line. malloc's 16-byte alignment split the AMX tiles' 64-byte row loads and stores over two
// lines wherever a thread's buffer happened to land off a line: the 2-thread bfloat16 forward ran
// one thread's products ~1.5x slower than the other's.
constexpr std::align_val_t kScratchAlignment{64};
struct ScratchDelete {
  void operator()(void* data) const { ::operator delete[](data, kScratchAlignment); }
};
template <typename T>
using Scratch = std::unique_ptr<T[], ScratchDelete>;
template <typename T>
Scratch<T> scratch(int64_t n) {
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>);
  return Scratch<T>(static_cast<T*>(::operator new[](std::max<int64_t>(n, 1) * sizeof(T), kScratchAlignment)));
}

// The row stride of a tile of n keys: whole cache lines plus one, so that its rows do not all map
// to the same few cache sets, as 512 floats (2 KiB) did: a product reading the tile down its
// columns, (p z)^T dO, ran at 68 GFLOP/s with that stride and 87-90 with 528 (MKL, one AMD EPYC
// core). Small tiles keep n.
inline int64_t padded_stride(int64_t n) { return n >= 64 ? (n + 15) / 16 * 16 + 16 : n; }

// ---- block products: row-major C[m x n] = alpha op(A) op(B) + beta C ----
template <typename acc_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a, int64_t lda,
          const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc);
// bfloat16 A and B, float32 C (only where bf16_products()).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const at::BFloat16* a,
          int64_t lda, const at::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc);

// ---- float32 block products where AVX2 is the widest ISA (attention_panels.cpp) ----
// K or V of one (batch, kv head), packed in panels of 16 columns for a hand-written AVX2
// micro-kernel (faster than MKL's sgemm on these tiles there), in a thread's scratch:
//   keys_as_columns (K^T, V^T: scores Q K^T, dp = dO V^T): ceil(S / 16) panels of [dim][16]
//   else            (V, K: (p z) V, ds K):                  ceil(dim / 16) panels of [S][16]
struct Panels {
  Scratch<float> data;
  int64_t dim = 0, panel_stride = 0;  // dim: E (of K) or Ev (of V)
  bool values = false, keys_as_columns = false;
  int64_t packed = -1;  // the (batch, kv head) b Hkv + hk in data, or -1
};
// Whether the float32 products take the panels: AVX2 + FMA without AVX-512, and enough query rows
// per kv head to pay for the packing.
bool panel_products(const Problem<float>& p);
// Room for one head's K (values false) or V.
Panels head_panels(const Problem<float>& p, bool values, bool keys_as_columns);
// x holds head (b, hk) after this (packed unless it already did).
void pack_panels(const Problem<float>& p, int64_t b, int64_t hk, Panels& x);
// With the keys [j0, j0 + n) of x's head (j0 a multiple of 16):
//   keys_as_columns:  c[rows x n]   = alpha a[rows x dim] X^T       (a's row stride lda)
//   else:             c[rows x dim] = alpha a[rows x n] X + c
void panel_product(const Panels& x, const float* a, int64_t lda, int64_t rows, int64_t j0, int64_t n, float alpha,
                   float* c, int64_t ldc);

// ---- the bfloat16 kernels' AMX block products (attention_amx.cpp) ----
// K and V of every (batch, kv head) packed per key block of block_n keys for the tiles.
struct PackedKV {
  at::Tensor k, v;
  at::Tensor k_pairs;  // the backward's K as row pairs, [block_n_even/2][E][2], for ds K
  int64_t block_n = 0, block_n_even = 0, blocks = 0, k_block = 0, v_block = 0, k_pairs_block = 0;
  bool v_transposed = false;  // V^T for the backward's dO V^T, else V for the forward's P V
};
// Whether the CPU has AMX-BF16 (and the head dims are even): then the products below, else gemm.
bool amx_products(const Problem<float, at::BFloat16>& p, bool backward);
PackedKV pack_kv(const Problem<float, at::BFloat16>& p, int64_t block_n, bool v_transposed);
// s[rows x n] (row stride ld_s) = Q[i .. i + rows) K[j0 .. j0 + n)^T of head h, batch b: unscaled;
// j0 a multiple of block_n.
void amx_scores(const Problem<float, at::BFloat16>& p, const PackedKV& packed, int64_t b, int64_t h, int64_t i,
                int64_t rows, int64_t j0, int64_t n, float* s, int64_t ld_s);
// acc[rows x Ev] += pz[rows x n] V[j0 .. j0 + n); pz's row stride ld_p, and a zero at column n when n is odd.
void amx_output(const Problem<float, at::BFloat16>& p, const PackedKV& packed, int64_t b, int64_t h, int64_t rows,
                int64_t j0, int64_t n, const at::BFloat16* pz, int64_t ld_p, float* acc);
// dp[rows x n] (row stride ld_dp) = dO[rows x Ev] (row stride ld_do) V[j0 .. j0 + n)^T (packed V^T).
void amx_dp(const Problem<float, at::BFloat16>& p, const PackedKV& packed, int64_t b, int64_t h, int64_t rows,
            int64_t j0, int64_t n, const at::BFloat16* dout, int64_t ld_do, float* dp, int64_t ld_dp);
// dq[rows x E] += ds[rows x n] K[j0 .. j0 + n) (unscaled); ds's row stride ld_ds, and a zero at column n
// when n is odd (the backward's packed K pairs).
void amx_dq(const Problem<float, at::BFloat16>& p, const PackedKV& packed, int64_t b, int64_t h, int64_t rows,
            int64_t j0, int64_t n, const at::BFloat16* ds, int64_t ld_ds, float* dq);
// The tile configuration of this thread given back (after a task's last product).
void amx_release();
// row[j] *= scale; scale_row_max also returns the max of the result (NaN ignored, as row_max).
void scale_row(float* row, int64_t n, float scale);
float scale_row_max(float* row, int64_t n, float scale);

// A tile's rows as a block product's operand: rows x n values of src (row stride ld) in in_t
// (row stride ld). For in_t = acc_t that is src itself; for bfloat16 they are rounded to
// nearest even into dst, and dst is returned.
void round_rows(const float* src, at::BFloat16* dst, int64_t rows, int64_t n, int64_t ld);
template <typename in_t, typename acc_t>
const in_t* tile_operand(const acc_t* src, in_t* dst, int64_t rows, int64_t n, int64_t ld) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    return src;
  } else {
    round_rows(src, dst, rows, n, ld);
    return dst;
  }
}

}  // namespace attention
}  // namespace cpu
}  // namespace fasttf
