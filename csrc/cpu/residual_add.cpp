// residual_add on the CPU:  out = residual + x
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "../checks.h"
#include "../ops.h"

namespace fasttf {
namespace cpu {

at::Tensor residual_add(const at::Tensor& x, const at::Tensor& residual) {
  const char* op = "residual_add";
  check_same_device(op, x, "x", residual, "residual");
  check_same_dtype(op, x, "x", residual, "residual");
  check_same_shape(op, x, "x", residual, "residual");
  check_floating(op, x, "x");
  const auto x_c = x.contiguous();
  const auto r_c = residual.contiguous();
  auto out = at::empty_like(x_c);
  const int64_t n = x_c.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_c.scalar_type(), "residual_add_cpu", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* xp = x_c.data_ptr<scalar_t>();
    const scalar_t* rp = r_c.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      for (; i + Vec::size() <= end; i += Vec::size()) {
        (Vec::loadu(xp + i) + Vec::loadu(rp + i)).store(op_ + i);
      }
      for (; i < end; ++i) op_[i] = static_cast<scalar_t>(static_cast<float>(xp[i]) + static_cast<float>(rp[i]));
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace fasttf
