// Helpers shared by the tiled CPU kernels (csrc/cpu/*.cpp) that reduce over all pairs of unit rows.
#pragma once
#include <ATen/ATen.h>

namespace fastssl {

// Rows are unit vectors, so s = q . k / tau <= m = 1/tau and exp(s - m) >= exp(-2/tau), which is a
// normal float (> 1.2e-38) while 2/tau <= 80: the fixed shift m is then exact.
inline bool fixed_shift_is_exact(double inv_tau) { return 2.0 * inv_tau <= 80.0; }

enum class Combine { kSum, kMax };

inline void combine_into(at::Tensor dst, const at::Tensor& src, Combine op) {
  if (op == Combine::kSum) {
    dst.add_(src);
  } else {
    at::maximum_out(dst, dst, src);
  }
}

}  // namespace fastssl
