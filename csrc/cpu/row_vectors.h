// The vector machinery of the CPU row kernels (row_math.cpp: add_rows, scale_add_rows; norm_rows.cpp:
// add_layer_norm's rows), included by those two files only. Each kernel is a template over the
// storage type S, the math type T and the vector width W in bytes, written once for a vector of
// kLanes<T, W> values and for one value (the row's tail): `ld`/`st` load and store either,
// converting S <-> T. Each public function is compiled three times (FASTTF_BY_WIDTH), W = 64 for
// AVX-512, 32 for AVX2 and 16 for plain x86-64 (and other CPUs), and picks one at run time (simd.h;
// FASTTF_CPU_ISA forces a lower one). One width for all would not do: GCC 12 builds 64-byte vectors
// on AVX2 out of register pairs, spills them and stores them through the stack in 16-byte pieces
// (add_layer_norm and residual_add ran at 0.5-0.9x of eager in such a build); each ISA gets vectors
// as wide as its registers.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "simd.h"

#if FASTTF_ISA_VERSIONS
#include <immintrin.h>  // declares the builtins of widen_u16 / narrow_u32 / stream_vector
#endif

// No fused multiply-add contraction: residual + x * m rounds like torch's eager
// `residual + F.dropout(x)`, so the two agree bit for bit in float32/float64.
#pragma GCC optimize("fp-contract=off")
#pragma GCC diagnostic ignored "-Wpsabi"  // wide vectors in always-inline helpers: no ABI is crossed

#define FASTTF_INLINE __attribute__((always_inline)) inline
#define FASTTF_LAMBDA __attribute__((always_inline))  // inlined into each width's function, not compiled once for x86-64

namespace fasttf {
namespace cpu {
namespace {

// W bytes of T (W / sizeof(T) lanes), the same for unaligned memory, and the matching vectors of
// uint32 lanes and (in memory) of the 16-bit storage types, one per float lane.
template <typename T, int W>
struct VecOf {
  typedef T type __attribute__((vector_size(W)));
  typedef T memory __attribute__((vector_size(W), aligned(alignof(T)), may_alias));
};
template <typename T, int W>
using Vec = typename VecOf<T, W>::type;
template <typename T, int W>
constexpr int64_t kLanes = W / sizeof(T);
template <int W>
struct Bits {
  typedef uint32_t u32 __attribute__((vector_size(W)));
  typedef uint16_t u16 __attribute__((vector_size(W / 2), aligned(2), may_alias));
};
template <int W>
using U32 = typename Bits<W>::u32;
template <int W>
using U16 = typename Bits<W>::u16;

// u16 <-> u32 lanes (narrowing: each value <= 0xFFFF). GCC 12 builds __builtin_convertvector's
// widening to 256 bits out of two 128-bit vpmovzxwd and a vinserti128, and its narrowing out of a
// mask, a vpackusdw and a vpermq; on AVX2 (W = 32) these call the one instruction's builtin instead
// (vpmovzxwd ymm, m128; vpackusdw of the two halves): a bfloat16 residual_add ran 0.91-0.97x of
// eager's on an AMD EPYC (Zen 3) with 24 vector instructions per 8 values, and 16 with these. Builtins,
// not intrinsics: an intrinsic is a target("avx2") function, which GCC refuses to inline into these
// generic templates; a builtin is checked where it is expanded, in the x86-64-v3 functions.
template <int W>
FASTTF_INLINE U32<W> widen_u16(U16<W> h) {
#if FASTTF_ISA_VERSIONS
  if constexpr (W == 32) {
    typedef short S16x8 __attribute__((vector_size(16)));
    return (U32<W>)__builtin_ia32_pmovzxwd256((S16x8)h);
  }
#endif
  return __builtin_convertvector(h, U32<W>);
}

template <int W>
FASTTF_INLINE U16<W> narrow_u32(U32<W> u) {
#if FASTTF_ISA_VERSIONS
  if constexpr (W == 32) {
    typedef int I32x4 __attribute__((vector_size(16)));
    I32x4 low, high;
    __builtin_memcpy(&low, &u, 16);
    __builtin_memcpy(&high, reinterpret_cast<const char*>(&u) + 16, 16);
    return (U16<W>)__builtin_ia32_packusdw128(low, high);  // saturates at 0xFFFF: exact for these values
  }
#endif
  return __builtin_convertvector(u, U16<W>);
}

// bfloat16 <-> float: the top half of the float's bits; rounding to nearest even, NaN -> 0x7FC0.
// (AVX-512: each bfloat16 placed in the high half of a 32-bit lane by interleaving it with zeros, one
// unpack per 128 bits, where GCC's widening convert then a shift took twice the instructions; AVX2:
// widen_u16's one vpmovzxwd, then the shift.)
template <int W, size_t... I>
FASTTF_INLINE Vec<float, W> bf16_interleave(U16<W> h, std::index_sequence<I...>) {
  constexpr size_t kLanes16 = W / 4;  // bfloat16 values in h
  const U16<W> zero{};
  typedef uint16_t Wide __attribute__((vector_size(W)));
  const Wide wide = __builtin_shufflevector(zero, h, (I % 2 == 0 ? I / 2 : kLanes16 + I / 2)...);
  return (Vec<float, W>)wide;
}

template <int W>
FASTTF_INLINE Vec<float, W> bf16_to_float(U16<W> h) {
  if constexpr (W == 32) {
    return (Vec<float, W>)(widen_u16<W>(h) << 16);
  } else {
    return bf16_interleave<W>(h, std::make_index_sequence<W / 2>{});
  }
}

// The bfloat16 bits of f, in the low half of each 32-bit lane.
template <int W>
FASTTF_INLINE U32<W> bf16_bits(Vec<float, W> f) {
  const U32<W> u = (U32<W>)f;
  const U32<W> rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  return f != f ? U32<W>{} + 0x7FC0u : rounded;  // one blend (AVX2), where and/andnot/or took three
}

template <int W>
FASTTF_INLINE U16<W> float_to_bf16(Vec<float, W> f) {
  return narrow_u32<W>(bf16_bits<W>(f));
}

// half <-> float, bit for bit c10's portable fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value.
template <int W>
FASTTF_INLINE Vec<float, W> half_to_float(U16<W> h) {
  using F = Vec<float, W>;
  using U = U32<W>;
  const U w = widen_u16<W>(h) << 16;
  const U sign = w & 0x80000000u;
  const U two_w = w + w;
  const F normalized = (F)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const F denormalized = (F)((two_w >> 17) | (126u << 23)) - 0.5f;
  const U small = (U)(two_w < (1u << 27));
  return (F)(sign | (((U)denormalized & small) | ((U)normalized & ~small)));
}

template <int W>
FASTTF_INLINE U16<W> float_to_half(Vec<float, W> f) {
  using F = Vec<float, W>;
  using U = U32<W>;
  const U w = (U)f;
  const F magnitude = (F)(w & 0x7FFFFFFFu);
  F base = (magnitude * 0x1.0p+112f) * 0x1.0p-110f;
  const U shl1_w = w + w;
  const U sign = w & 0x80000000u;
  U bias = shl1_w & 0xFF000000u;
  const U low = (U)(bias < 0x71000000u);
  bias = (bias & ~low) | (0x71000000u & low);
  base = (F)((bias >> 1) + 0x07800000u) + base;
  const U bits = (U)base;
  const U nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const U nan = (U)(shl1_w > 0xFF000000u);
  return narrow_u32<W>((sign >> 16) | ((0x7E00u & nan) | (nonsign & ~nan)));
}

// kLanes<T, W> values of S at p as a Vec<T, W>, and back.
template <typename T, int W, typename S>
FASTTF_INLINE Vec<T, W> load_vec(const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    return *reinterpret_cast<const typename VecOf<T, W>::memory*>(p);
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    return bf16_to_float<W>(*reinterpret_cast<const U16<W>*>(p));
  } else {
    static_assert(std::is_same_v<S, c10::Half>, "a storage type of row_math");
    return half_to_float<W>(*reinterpret_cast<const U16<W>*>(p));
  }
}

template <typename S, typename T, int W>
FASTTF_INLINE void store_vec(S* p, Vec<T, W> v) {
  if constexpr (std::is_same_v<S, T>) {
    *reinterpret_cast<typename VecOf<T, W>::memory*>(p) = v;
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    *reinterpret_cast<U16<W>*>(p) = float_to_bf16<W>(v);
  } else {
    *reinterpret_cast<U16<W>*>(p) = float_to_half<W>(v);
  }
}

// The loop's tag: a vector of W bytes (Lanes<W>) or one value (OneTag).
template <int W>
using Lanes = std::integral_constant<int, W>;
using OneTag = std::integral_constant<int, 0>;

// A vector or one value, by the tag's width: ld<T, Wd>(p) and st<Wd>(p, value) (Wd = 0: one value).
template <typename T, int Wd, typename S>
FASTTF_INLINE auto ld(const S* p) {
  if constexpr (Wd != 0) {
    return load_vec<T, Wd>(p);
  } else {
    return static_cast<T>(*p);
  }
}

template <int Wd, typename S, typename X>
FASTTF_INLINE void st(S* p, X value) {
  if constexpr (Wd != 0) {
    store_vec<S, decltype(value[0] + 0), Wd>(p, value);
  } else {
    *p = static_cast<S>(value);
  }
}

// Stores value at p as S and returns what was stored, as T (bfloat16: without reading it back).
template <int Wd, typename T, typename S, typename X>
FASTTF_INLINE X store_rounded(S* p, X value) {
  if constexpr (Wd != 0 && std::is_same_v<S, c10::BFloat16>) {
    const U32<Wd> bits = bf16_bits<Wd>(value);
    *reinterpret_cast<U16<Wd>*>(p) = narrow_u32<Wd>(bits);
    return (X)(bits << 16);
  } else {
    st<Wd>(p, value);
    return ld<T, Wd>(p);
  }
}

// One vector v (8 to 64 bytes) stored at p past the caches (p aligned to its size): movnti / movntdq,
// builtins checked where they are expanded, in the per-ISA functions (the 64-byte one only in
// AVX-512's). A plain store where there are no per-ISA builds.
template <typename V>
FASTTF_INLINE void stream_vector(void* p, V v) {
#if FASTTF_ISA_VERSIONS
  if constexpr (sizeof(V) == 8) {
    long long bits;
    __builtin_memcpy(&bits, &v, 8);
    __builtin_ia32_movnti64(static_cast<long long*>(p), bits);
  } else if constexpr (sizeof(V) == 16) {
    typedef long long I64x2 __attribute__((vector_size(16)));
    __builtin_ia32_movntdq(static_cast<I64x2*>(p), (I64x2)v);
  } else if constexpr (sizeof(V) == 32) {
    typedef long long I64x4 __attribute__((vector_size(32)));
    __builtin_ia32_movntdq256(static_cast<I64x4*>(p), (I64x4)v);
  } else {
    static_assert(sizeof(V) == 64, "a vector of 8 to 64 bytes");
    typedef long long I64x8 __attribute__((vector_size(64)));
    __builtin_ia32_movntdq512(static_cast<I64x8*>(p), (I64x8)v);
  }
#else
  __builtin_memcpy(p, &v, sizeof(V));
#endif
}

// st, or with kStream a vector streamed past the caches (p aligned: see vector_aligned).
template <int Wd, bool kStream, typename S, typename X>
FASTTF_INLINE void st_out(S* p, X value) {
  if constexpr (kStream && Wd != 0) {
    using T = decltype(value[0] + 0);
    if constexpr (std::is_same_v<S, T>) {
      stream_vector(p, value);
    } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
      stream_vector(p, float_to_bf16<Wd>(value));
    } else {
      stream_vector(p, float_to_half<Wd>(value));
    }
  } else {
    st<Wd>(p, value);
  }
}

// store_rounded, streamed with kStream: what was stored comes from the rounded bits, not read back.
template <int Wd, typename T, bool kStream, typename S, typename X>
FASTTF_INLINE X store_rounded_out(S* p, X value) {
  if constexpr (!kStream || Wd == 0) {
    return store_rounded<Wd, T>(p, value);
  } else if constexpr (std::is_same_v<S, T>) {
    stream_vector(p, value);
    return value;
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const U32<Wd> bits = bf16_bits<Wd>(value);
    stream_vector(p, narrow_u32<Wd>(bits));
    return (X)(bits << 16);
  } else {
    const U16<Wd> bits = float_to_half<Wd>(value);
    stream_vector(p, bits);
    return half_to_float<Wd>(bits);
  }
}

// Whether p suits the streamed stores of vectors of kLanes<T, W> values of S from p on.
template <typename S, typename T, int W>
FASTTF_INLINE bool vector_aligned(const void* p) {
  return p != nullptr && reinterpret_cast<uintptr_t>(p) % (kLanes<T, W> * sizeof(S)) == 0;
}

// The sum of a vector's lanes as a tree (log2 of the lanes steps, not a chain of adds): the upper
// half added onto the lower half until one lane is left.
template <typename T, int W>
FASTTF_INLINE T horizontal_sum(Vec<T, W> v) {
  if constexpr (W == static_cast<int>(sizeof(T))) {
    return v[0];
  } else {
    constexpr int kHalf = W / 2;
    Vec<T, kHalf> low, high;
    __builtin_memcpy(&low, &v, kHalf);
    __builtin_memcpy(&high, reinterpret_cast<const char*>(&v) + kHalf, kHalf);
    return horizontal_sum<T, kHalf>(low + high);
  }
}

// body(j, tag) for every j in [0, n): vectors of kLanes<T, W>, then the tail one value at a time.
template <typename T, int W, typename F>
FASTTF_INLINE void for_lanes(int64_t n, F body) {
  int64_t j = 0;
  for (; j + kLanes<T, W> <= n; j += kLanes<T, W>) body(j, Lanes<W>{});
  for (; j < n; ++j) body(j, OneTag{});
}

// f(0), f(1), ..., f(R - 1), unrolled: the rows of a group, each with its own registers.
template <int R, typename F>
FASTTF_INLINE void each_row(F f) {
  if constexpr (R > 0) {
    each_row<R - 1>(f);
    f(R - 1);
  }
}

// sums[r] = the sum over j of term(r, j, tag) for R rows at once: four vector accumulators a row (term
// runs once per (r, j), in order of j within a row). A row's adds come in the same order for every R,
// so its sum has the same bits; the rows' chains of adds are interleaved so their latencies overlap.
template <typename T, int W, int R, typename F>
FASTTF_INLINE void sum_lanes(int64_t n, F term, T* sums) {
  constexpr int64_t L = kLanes<T, W>;
  Vec<T, W> a0[R] = {}, a1[R] = {}, a2[R] = {}, a3[R] = {};
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    each_row<R>([&](int r) FASTTF_LAMBDA {
      a0[r] += term(r, j, Lanes<W>{});
      a1[r] += term(r, j + L, Lanes<W>{});
      a2[r] += term(r, j + 2 * L, Lanes<W>{});
      a3[r] += term(r, j + 3 * L, Lanes<W>{});
    });
  }
  for (; j + L <= n; j += L) each_row<R>([&](int r) FASTTF_LAMBDA { a0[r] += term(r, j, Lanes<W>{}); });
  each_row<R>([&](int r) FASTTF_LAMBDA { sums[r] = horizontal_sum<T, W>((a0[r] + a1[r]) + (a2[r] + a3[r])); });
  for (; j < n; ++j) each_row<R>([&](int r) FASTTF_LAMBDA { sums[r] += term(r, j, OneTag{}); });
}

// Two sums a row at once: term(r, j, tag, first, second) adds to both; two accumulators each.
template <typename T, int W, int R, typename F>
FASTTF_INLINE void sum2_lanes(int64_t n, F term, T* firsts, T* seconds) {
  constexpr int64_t L = kLanes<T, W>;
  Vec<T, W> a0[R] = {}, a1[R] = {}, b0[R] = {}, b1[R] = {};
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    each_row<R>([&](int r) FASTTF_LAMBDA {
      term(r, j, Lanes<W>{}, a0[r], b0[r]);
      term(r, j + L, Lanes<W>{}, a1[r], b1[r]);
    });
  }
  for (; j + L <= n; j += L) each_row<R>([&](int r) FASTTF_LAMBDA { term(r, j, Lanes<W>{}, a0[r], b0[r]); });
  each_row<R>([&](int r) FASTTF_LAMBDA {
    firsts[r] = horizontal_sum<T, W>(a0[r] + a1[r]);
    seconds[r] = horizontal_sum<T, W>(b0[r] + b1[r]);
  });
  for (; j < n; ++j) each_row<R>([&](int r) FASTTF_LAMBDA { term(r, j, OneTag{}, firsts[r], seconds[r]); });
}

}  // namespace
}  // namespace cpu
}  // namespace fasttf

// Each public function: its kernel `name##_any` at the vector width of the best ISA this CPU has
// (64 bytes AVX-512, 32 AVX2, 16 plain x86-64; simd.h's dispatch).
#if FASTTF_ISA_VERSIONS
#define FASTTF_BY_WIDTH(S, T, name, params, args)                               \
  namespace {                                                                   \
  FASTTF_TARGET_AVX512 void name##_avx512 params { name##_any<S, T, 64> args; } \
  FASTTF_TARGET_AVX2 void name##_avx2 params { name##_any<S, T, 32> args; }     \
  void name##_x86_64 params { name##_any<S, T, 16> args; }                      \
  }                                                                             \
  FASTTF_DISPATCH_ISA(void, name, params, args)
#else
#define FASTTF_BY_WIDTH(S, T, name, params, args) \
  void name params { name##_any<S, T, 16> args; }
#endif
