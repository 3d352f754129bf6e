// The accumulation type of a dtype on the CPU kernels (their row math is in row_math.h).
#pragma once
#include <type_traits>

namespace fasttf {
namespace cpu {

// Math in float for float32 and the 16-bit types, in double for float64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace cpu
}  // namespace fasttf
