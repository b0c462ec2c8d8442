// Scale-safe row norms in one pass: the C++ twin of fastssl/_rows.py's power_of_two_scales and
// inverse_norms, for the rows of a large tensor (MoCHi's queue) that those would read three times.
//
// For row x_i, e_i is the binary exponent of its largest |x_id| (frexp: max = f 2^e, f in [0.5, 1)),
// scale_i = 2^-e_i (exact; capped at the accumulation dtype's largest power of two; 1 for a zero
// or non-finite row, as torch.frexp's exponent 0 gives) and inv_i = scale_i / ||x_i scale_i||, 0
// where that norm is not positive (a zero row, or a NaN one), as inverse_norms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>  // at::vec::convert

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/vec_math.h"
#include "ops.h"

namespace {

template <typename scalar_t, typename acc_t>
FASTSSL_ROW_KERNEL void row_scales(const scalar_t* x, int64_t n, int64_t d, acc_t* scale, acc_t* inv) {
  constexpr int largest = std::numeric_limits<acc_t>::max_exponent - 1;  // 127 for fp32
  std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : d);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* row;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      row = x + i * d;
    } else {
      at::vec::convert(x + i * d, buf.data(), d);
      row = buf.data();
    }
    // max |x_id|: exact in any order, so an OpenMP max reduction may reorder it (and vectorise); a
    // NaN, which max does not order, is caught by the sum of squares below
    acc_t top = 0;
#pragma omp simd reduction(max : top)
    for (int64_t k = 0; k < d; ++k) top = std::max(top, std::abs(row[k]));
    int e = 0;
    if (std::isfinite(top) && top > 0) std::frexp(top, &e);
    acc_t s = std::ldexp(acc_t(1), std::min(-e, largest));
    fastssl::Lanes<acc_t> part = {};
    int64_t k = 0;
    for (; k + fastssl::kLanes <= d; k += fastssl::kLanes) {
      const fastssl::Lanes<acc_t> v = fastssl::load_lanes(row + k) * s;
      part += v * v;
    }
    acc_t tail[fastssl::kLanes];
    for (int64_t j = k; j < d; ++j) tail[j - k] = (row[j] * s) * (row[j] * s);
    const acc_t sq = fastssl::lanes_total(part, tail, d - k);
    if (sq != sq) s = 1;  // a NaN in the row: its scale is 1, as torch.frexp(NaN) gives
    const acc_t norm = std::sqrt(sq);
    scale[i] = s;
    inv[i] = norm > 0 ? s / norm : acc_t(0);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> row_scales_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "row_scales_cpu: x must be a 2-D CPU tensor, got ",
              x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor scale = at::empty({n}, x.options().dtype(acc)), inv = at::empty({n}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "row_scales_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    acc_t* sp = scale.data_ptr<acc_t>();
    acc_t* ip = inv.data_ptr<acc_t>();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      row_scales(xp + begin * d, end - begin, d, sp + begin, ip + begin);
    });
  });
  return {scale, inv};
}
