// The elementwise passes of the fixed-shift tile kernels (csrc/tiles.h: exp_sums, exp_weights).
//
// One pass per tile, vectorised on a baseline-ISA build through csrc/cpu/vec_math.h (clones per x86-64
// level, Cephes' expf for fp32; fp64, for gradcheck, uses std::exp). The row sums take kLanes
// partial sums in a fixed order, so every clone gives the same bits.
#include <ATen/ATen.h>

#include "cpu/vec_math.h"
#include "tiles.h"

namespace fastssl {
namespace {

bool left_out(int64_t i, int64_t drop, int64_t c) { return drop != kKeepAll && i + drop >= 0 && i + drop < c; }

template <class T>
FASTSSL_ROW_KERNEL void exp_sums_rows(T* e, int64_t r, int64_t c, T scale, T shift, int64_t drop, T* row, T* col) {
  for (int64_t i = 0; i < r; ++i) {
    T* p = e + i * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) p[j] = exp_tile(scale * p[j] - shift);
    // zeroed before the sums: subtracting it after would cancel the row's small terms
    if (left_out(i, drop, c)) p[i + drop] = 0;
    row[i] = lane_sum(p, c);
    if (col != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) col[j] += p[j];
    }
  }
}

template <class T>
FASTSSL_ROW_KERNEL void exp_weights_rows(T* a, int64_t r, int64_t c, T scale, T shift, const T* u, const T* v, int64_t drop) {
  for (int64_t i = 0; i < r; ++i) {
    T* p = a + i * c;
    const T ui = u[i];
    if (v != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) p[j] = exp_tile(scale * p[j] - shift) * (ui + v[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) p[j] = exp_tile(scale * p[j] - shift) * ui;
    }
    if (left_out(i, drop, c)) p[i + drop] = 0;
  }
}

void check_tile(const at::Tensor& s) {
  TORCH_INTERNAL_ASSERT(s.is_contiguous() && s.dim() == 2 &&
                        (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble));
}

}  // namespace

std::pair<at::Tensor, at::Tensor> exp_sums(at::Tensor& s, double scale, double shift, int64_t drop, bool cols) {
  check_tile(s);
  const int64_t r = s.size(0), c = s.size(1);
  at::Tensor row = at::empty({r, 1}, s.options());
  at::Tensor col = cols ? at::zeros({c, 1}, s.options()) : at::Tensor();
  if (s.scalar_type() == at::kFloat) {
    exp_sums_rows(s.data_ptr<float>(), r, c, static_cast<float>(scale), static_cast<float>(shift), drop, row.data_ptr<float>(),
                 cols ? col.data_ptr<float>() : nullptr);
  } else {
    exp_sums_rows(s.data_ptr<double>(), r, c, scale, shift, drop, row.data_ptr<double>(),
                  cols ? col.data_ptr<double>() : nullptr);
  }
  return {row, col};
}

void exp_weights(at::Tensor& s, double scale, double shift, const at::Tensor& u, const at::Tensor& v, int64_t drop) {
  check_tile(s);
  const int64_t r = s.size(0), c = s.size(1);
  const at::Tensor uc = u.to(s.scalar_type()).contiguous();
  const at::Tensor vc = v.defined() ? v.to(s.scalar_type()).contiguous() : at::Tensor();
  TORCH_INTERNAL_ASSERT(uc.numel() == r && (!vc.defined() || vc.numel() == c));
  if (s.scalar_type() == at::kFloat) {
    exp_weights_rows(s.data_ptr<float>(), r, c, static_cast<float>(scale), static_cast<float>(shift), uc.data_ptr<float>(),
                    vc.defined() ? vc.data_ptr<float>() : nullptr, drop);
  } else {
    exp_weights_rows(s.data_ptr<double>(), r, c, scale, shift, uc.data_ptr<double>(),
                     vc.defined() ? vc.data_ptr<double>() : nullptr, drop);
  }
}

}  // namespace fastssl
