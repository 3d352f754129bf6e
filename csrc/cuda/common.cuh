// Device helpers shared by the .cu files: float <-> storage type, packs of VEC values loaded
// with one 16-byte (or narrower) access, a block-wide sum, and the dtype switch of the launchers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../philox.h"
#include "launchers.h"

namespace fasttf {
namespace cuda {

// The type a kernel computes in for storage type T: float for float32/float16/bfloat16, double
// for float64 (as torch's opmath_type).
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A product and a sum each rounded on its own (never contracted into one fma): the kernels match
// torch's eager `a * b` then `+ c` bit for bit, and a product summed once and subtracted later
// cancels exactly.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

// VEC values of T moved as one aligned access (16 bytes for double x2, float x4 or half x8).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC values of T as one aligned access, left in T (a load in flight while other work runs).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void to_acc(const Pack<T, VEC>& pack, acc_t<T>* out) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_acc(pack.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void load_acc(const T* p, acc_t<T>* out) {
  to_acc<T, VEC>(load_pack<T, VEC>(p), out);
}

// VEC values at base + at in the compute type, or `fill` where base is null (an optional tensor left out).
template <typename T, int VEC>
__device__ __forceinline__ void load_acc_or(const T* base, int64_t at, acc_t<T> fill, acc_t<T>* out) {
  if (base) {
    load_acc<T, VEC>(base + at, out);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = fill;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_acc(T* p, const acc_t<T>* in) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pack.v[j] = from_acc<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// The widest VEC <= 16 bytes / sizeof(T) such that every pointer is aligned and n (the row
// length or element count) is a multiple of it.
template <typename T>
inline int pick_vec(int64_t n, const void* a, const void* b = nullptr, const void* c = nullptr,
                    const void* d = nullptr) {
  int vec = static_cast<int>(16 / sizeof(T));
  auto aligned = [&](const void* p, int v) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % (sizeof(T) * v) == 0;
  };
  while (vec > 1 && !(n % vec == 0 && aligned(a, vec) && aligned(b, vec) && aligned(c, vec) && aligned(d, vec))) {
    vec /= 2;
  }
  return vec;
}

// Dropout multipliers of VEC consecutive elements starting at `index` (a multiple of VEC):
// one Philox call per 4 elements.
template <int VEC, typename A>
__device__ __forceinline__ void dropout_multipliers(uint64_t seed, uint64_t index, uint32_t threshold, A scale,
                                                    A* m) {
  if (VEC >= 4) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      const PhiloxWords w = philox4x32_10(seed, (index + j) >> 2);
#pragma unroll
      for (int k = 0; k < 4; ++k) m[j + k] = w.w[k] >= threshold ? scale : A(0);
    }
  } else {
    const PhiloxWords w = philox4x32_10(seed, index >> 2);
#pragma unroll
    for (int j = 0; j < VEC; ++j) m[j] = w.w[(index + j) & 3] >= threshold ? scale : A(0);
  }
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename A>
__device__ __forceinline__ A block_sum(A value, A* shared32) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();  // shared32 may still be read by a previous call
  if (lane == 0) shared32[warp] = value;
  __syncthreads();
  value = lane < warps ? shared32[lane] : A(0);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

inline unsigned int blocks_for(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > 65535LL * 32) blocks = 65535LL * 32;  // grid-stride loops cover the rest
  return static_cast<unsigned int>(blocks);
}

// Calls f(std::integral_constant<int, VEC>{}) for vec = 8, 4, 2, else 1: a launcher's VEC (from
// pick_vec) as the compile-time constant its kernels are instantiated with.
template <typename F>
void dispatch_vec(int vec, F f) {
  switch (vec) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// Calls f.template operator()<T>() with T the storage type of dtype.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fasttf
