// Helpers of the CPU kernels: the accumulation type of a dtype, rows converted to it and back,
// and Vectorized loops over one row.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <type_traits>

namespace fasttf {
namespace cpu {

// Math in float for float32 and the 16-bit types, in double for float64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A row as acc_t: the row itself when the types agree, else converted into `buffer`.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_row(const scalar_t* row, acc_t* buffer, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    for (int64_t j = 0; j < n; ++j) buffer[j] = static_cast<acc_t>(row[j]);
    return buffer;
  }
}

// Where to write an acc_t row that ends up in `row`: `row` itself, or `buffer` (then store_row).
template <typename scalar_t, typename acc_t>
inline acc_t* output_row(scalar_t* row, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    return buffer;
  }
}

template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* buffer, scalar_t* row, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t j = 0; j < n; ++j) row[j] = static_cast<scalar_t>(buffer[j]);
  }
}

// out[j] = f(a[j], b[j]) for Vectorized and scalar arguments alike.
template <typename T, typename F>
inline void map2(T* out, const T* a, const T* b, int64_t n, F f) {
  using Vec = at::vec::Vectorized<T>;
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) f(Vec::loadu(a + j), Vec::loadu(b + j)).store(out + j);
  for (; j < n; ++j) out[j] = f(a[j], b[j]);
}

template <typename T, typename F>
inline void map3(T* out, const T* a, const T* b, const T* c, int64_t n, F f) {
  using Vec = at::vec::Vectorized<T>;
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size())
    f(Vec::loadu(a + j), Vec::loadu(b + j), Vec::loadu(c + j)).store(out + j);
  for (; j < n; ++j) out[j] = f(a[j], b[j], c[j]);
}

template <typename T>
inline T vec_sum(const T* a, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = acc + Vec::loadu(a + j);
  T total = at::vec::vec_reduce_all<T>([](Vec& p, Vec& q) { return p + q; }, acc);
  for (; j < n; ++j) total += a[j];
  return total;
}

}  // namespace cpu
}  // namespace fasttf
