// The bfloat16 kernels' block products on AMX tiles (oneDNN's brgemm micro-kernel, which torch
// exports as at::native::cpublas::brgemm): K and V packed once a call into the VNNI layout the
// tiles read -- B[k][n] stored as pairs along k, [K/2][N][2] -- so no tile product repacks them
// (MKL's gemm_bf16bf16f32 copies both operands of every call: 2x slower here).
//
//   scores  s = Q_i K_j^T:  A = Q rows (bfloat16, read in place), B = K_j^T packed per key block as
//                           [E/2][block_n][2] (keys past S zero)
//   output  acc += P V_j:   A = the rounded p z rows (an even count of columns, a zero appended to
//                           odd ones), B = V_j packed as [n_even/2][Ev][2] (rows past S zero)
//
// The backward multiplies s = Q_i K_j^T and dp = dO_i V_j^T on the tiles (V^T packed as K^T is), and
// dq += ds K_j (K packed a second time, as row pairs like the forward's V); its (p z)^T dO and ds^T Q,
// whose transposed operands it makes per tile, stay on MKL's bfloat16 GEMM.
// Used where the CPU has AMX-BF16 (cpublas::could_pack) and the head dims are even (a VNNI pair);
// elsewhere the bfloat16 kernels run MKL's bfloat16 GEMM (attention_inputs.cpp).
// GCC 12's AVX-512 headers trip its own uninitialised-value warnings (_mm512_undefined_*), as in
// attention_rows.cpp.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "attention.h"

namespace fasttf {
namespace cpu {
namespace attention {

namespace {

// dst[w * ld + j] = the 32-bit word w of row j (rows at a stride of `stride` 16-bit elements), for
// j < count (j < valid: the row's word, else 0) and w < words: a transpose, 16 rows a gather.
__attribute__((target("avx512f"))) void gather_pairs(const uint16_t* rows, int64_t stride, int64_t valid,
                                                     int64_t count, int64_t words, uint32_t* dst, int64_t ld) {
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(stride)));
  const __mmask16 read = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1u);
  const __mmask16 write = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1u);
  for (int64_t w = 0; w < words; ++w) {
    // 16-bit elements: byte offset = 2 * (j * stride) + 4 * w
    const __m512i word = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), read, offsets, rows + 2 * w, 2);
    _mm512_mask_storeu_epi32(dst + w * ld, write, word);
  }
}

// dst[w * block_n + j] = word w of row j for the block_n rows at rows + j * stride (rows j >= n: 0),
// gathered 16 rows at a time.
void pack_transposed(const uint16_t* rows, int64_t stride, int64_t n, int64_t block_n, int64_t words,
                     uint32_t* dst) {
  for (int64_t jb = 0; jb < block_n; jb += 16) {
    gather_pairs(rows + jb * stride, stride, std::max<int64_t>(0, std::min<int64_t>(16, n - jb)),
                 std::min<int64_t>(16, block_n - jb), words, dst + jb, block_n);
  }
}

// dst[e] = the pair (even[e], odd[e]) as one 32-bit word, e < n.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void interleave_pairs(const uint16_t* even, const uint16_t* odd,
                                                                           int64_t n, uint32_t* dst) {
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 lanes = n - e >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - e)) - 1u);
    const __m512i low = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, even + e));
    const __m512i high = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, odd + e));
    _mm512_mask_storeu_epi32(dst + e, lanes, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
  }
}

// Row pairs: word (j/2, e) of dst = the pair (row j [e], row j + 1 [e]) for even j < count, rows at
// a stride of `stride` 16-bit elements; rows j >= n zero (the keys past S, an odd block's pad row).
void pack_row_pairs(const uint16_t* rows, int64_t stride, int64_t n, int64_t count, int64_t width, uint32_t* dst) {
  for (int64_t j = 0; j < count; j += 2) {
    const uint16_t* even = j < n ? rows + j * stride : nullptr;
    const uint16_t* odd = j + 1 < n ? rows + (j + 1) * stride : nullptr;
    uint32_t* out = dst + (j / 2) * width;
    if (even != nullptr && odd != nullptr) {
      interleave_pairs(even, odd, width, out);
    } else {
      for (int64_t e = 0; e < width; ++e) out[e] = even != nullptr ? uint32_t(even[e]) : 0u;
    }
  }
}

}  // namespace

bool amx_products(const Problem<float, at::BFloat16>& p, bool backward) {
  static const bool available = at::native::cpublas::could_pack(at::kBFloat16);
  constexpr int64_t kMaxStride = int64_t(1) << 26;  // 16 row offsets as int32 (gather_pairs)
  return available && p.E % 2 == 0 && p.k_sl < kMaxStride && (!backward || (p.Ev % 2 == 0 && p.v_sl < kMaxStride));
}

PackedKV pack_kv(const Problem<float, at::BFloat16>& p, int64_t block_n, bool v_transposed) {
  PackedKV packed;
  packed.block_n = block_n;
  packed.block_n_even = block_n + (block_n & 1);
  packed.blocks = (p.S + block_n - 1) / block_n;
  packed.v_transposed = v_transposed;
  packed.k_block = p.E * block_n;  // [E/2][block_n][2]
  // [block_n_even/2][Ev][2], or V^T as K^T: [Ev/2][block_n][2]
  packed.v_block = v_transposed ? p.Ev * block_n : packed.block_n_even * p.Ev;
  const int64_t heads = p.N * p.Hkv;
  packed.k = at::empty({heads * packed.blocks * packed.k_block}, at::kBFloat16);
  packed.v = at::empty({heads * packed.blocks * packed.v_block}, at::kBFloat16);
  uint32_t* k_pairs = nullptr;
  if (v_transposed) {
    packed.k_pairs_block = packed.block_n_even * p.E;
    packed.k_pairs = at::empty({heads * packed.blocks * packed.k_pairs_block}, at::kBFloat16);
    k_pairs = reinterpret_cast<uint32_t*>(packed.k_pairs.data_ptr<at::BFloat16>());
  }
  uint32_t* const k_words = reinterpret_cast<uint32_t*>(packed.k.data_ptr<at::BFloat16>());
  uint16_t* const v_out = reinterpret_cast<uint16_t*>(packed.v.data_ptr<at::BFloat16>());
  at::parallel_for(0, heads * packed.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / packed.blocks, block = task % packed.blocks;
      const int64_t b = head / p.Hkv, hk = head % p.Hkv, j0 = block * block_n;
      const int64_t n = std::min(block_n, p.S - j0);
      // K^T: word (w, j) = the pair (k[j][2w], k[j][2w + 1]); keys past S zero
      pack_transposed(reinterpret_cast<const uint16_t*>(p.k_row(b, hk, j0)), p.k_sl, n, block_n, p.E / 2,
                      k_words + task * (packed.k_block / 2));
      uint32_t* vd = reinterpret_cast<uint32_t*>(v_out + task * packed.v_block);
      if (v_transposed) {  // V^T, as K^T; and K as row pairs, as the forward's V
        pack_transposed(reinterpret_cast<const uint16_t*>(p.v_row(b, hk, j0)), p.v_sl, n, block_n, p.Ev / 2, vd);
        pack_row_pairs(reinterpret_cast<const uint16_t*>(p.k_row(b, hk, j0)), p.k_sl, n, packed.block_n_even, p.E,
                       k_pairs + task * (packed.k_pairs_block / 2));
        continue;
      }
      pack_row_pairs(reinterpret_cast<const uint16_t*>(p.v_row(b, hk, j0)), p.v_sl, n, packed.block_n_even, p.Ev,
                     vd);
    }
  });
  return packed;
}

namespace {

// The packed block (of block_size elements in `buffer`, packed.k or packed.v) holding keys j0.. of
// query head h's kv head in batch b.
const at::BFloat16* packed_block(const Problem<float, at::BFloat16>& p, const PackedKV& packed,
                                 const at::Tensor& buffer, int64_t block_size, int64_t b, int64_t h, int64_t j0) {
  const int64_t head = b * p.Hkv + h / p.group;
  return buffer.data_ptr<at::BFloat16>() + (head * packed.blocks + j0 / packed.block_n) * block_size;
}

}  // namespace

void amx_scores(const Problem<float, at::BFloat16>& p, const PackedKV& packed, int64_t b, int64_t h, int64_t i,
                int64_t rows, int64_t j0, int64_t n, float* s, int64_t ld_s) {
  if (rows <= 0 || n <= 0) return;
  at::native::cpublas::brgemm(rows, n, p.E, p.q_sl, packed.block_n, ld_s, /*add_C=*/false, p.q_row(b, h, i),
                              packed_block(p, packed, packed.k, packed.k_block, b, h, j0), s, /*is_vnni=*/true);
}

void amx_output(const Problem<float, at::BFloat16>& p, const PackedKV& packed, int64_t b, int64_t h, int64_t rows,
                int64_t j0, int64_t n, const at::BFloat16* pz, int64_t ld_p, float* acc) {
  if (rows <= 0 || n <= 0) return;
  TORCH_INTERNAL_ASSERT(!packed.v_transposed);
  at::native::cpublas::brgemm(rows, p.Ev, n + (n & 1), ld_p, p.Ev, p.Ev, /*add_C=*/true, pz,
                              packed_block(p, packed, packed.v, packed.v_block, b, h, j0), acc, /*is_vnni=*/true);
}

void amx_dp(const Problem<float, at::BFloat16>& p, const PackedKV& packed, int64_t b, int64_t h, int64_t rows,
            int64_t j0, int64_t n, const at::BFloat16* dout, int64_t ld_do, float* dp, int64_t ld_dp) {
  if (rows <= 0 || n <= 0) return;
  TORCH_INTERNAL_ASSERT(packed.v_transposed);
  at::native::cpublas::brgemm(rows, n, p.Ev, ld_do, packed.block_n, ld_dp, /*add_C=*/false, dout,
                              packed_block(p, packed, packed.v, packed.v_block, b, h, j0), dp, /*is_vnni=*/true);
}

void amx_dq(const Problem<float, at::BFloat16>& p, const PackedKV& packed, int64_t b, int64_t h, int64_t rows,
            int64_t j0, int64_t n, const at::BFloat16* ds, int64_t ld_ds, float* dq) {
  if (rows <= 0 || n <= 0) return;
  TORCH_INTERNAL_ASSERT(packed.k_pairs.defined());
  at::native::cpublas::brgemm(rows, p.E, n + (n & 1), ld_ds, p.E, p.E, /*add_C=*/true, ds,
                              packed_block(p, packed, packed.k_pairs, packed.k_pairs_block, b, h, j0), dq,
                              /*is_vnni=*/true);
}

void amx_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

}  // namespace attention
}  // namespace cpu
}  // namespace fasttf
