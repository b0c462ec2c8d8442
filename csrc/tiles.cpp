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

// The optional row and column scales w, wc (nullptr: 1) enter the exponent as scale w_i wc_j s_ij.
// One pass per row, kLanes columns at a time: each e_ij goes into the row's partial sums (a register)
// and the column sum, and is not stored (the sums are all the forward needs), so the tile is read once.
// The sums are added to row and col.
template <class T>
FASTSSL_ROW_KERNEL void exp_sums_rows(const T* s, int64_t r, int64_t c, T scale, T shift, int64_t drop, T* row,
                                      T* col, const T* w, const T* wc) {
  for (int64_t i = 0; i < r; ++i) {
    const T* p = s + i * c;
    const T si = w != nullptr ? scale * w[i] : scale;
    // the left-out pair is zeroed before the sums: subtracting it after would cancel the row's small terms
    const int64_t skip = left_out(i, drop, c) ? i + drop : -1;
    // one chunk of e_ij, for j0 <= j < j0 + n; aligned, so that reading it back as one vector is
    // forwarded from the stores (a misaligned 64-byte reload stalls on them)
    alignas(sizeof(Lanes<T>)) T e[kLanes];
    const auto chunk = [&](int64_t j0, int64_t n) {
      if (wc != nullptr) {
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) e[l] = exp_tile(si * wc[j0 + l] * p[j0 + l] - shift);
      } else {
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) e[l] = exp_tile(si * p[j0 + l] - shift);
      }
      if (j0 <= skip && skip < j0 + n) e[skip - j0] = 0;
      if (col != nullptr) {
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) col[j0 + l] += e[l];
      }
    };
    Lanes<T> part = {};
    int64_t k = 0;
    for (; k + kLanes <= c; k += kLanes) {
      chunk(k, kLanes);
      part += load_lanes(e);
    }
    chunk(k, c - k);
    row[i] += lanes_total(part, e, c - k);
  }
}

// As exp_sums_rows, times (u_i + v_j) and, with scales, w_i wc_j.
template <class T>
FASTSSL_ROW_KERNEL void exp_weights_rows(T* a, int64_t r, int64_t c, T scale, T shift, const T* u, const T* v, int64_t drop,
                                         const T* w, const T* wc) {
  for (int64_t i = 0; i < r; ++i) {
    T* p = a + i * c;
    const T ui = u[i];
    const T wi = w != nullptr ? w[i] : T(1);
    const T si = scale * wi;
    if (wc != nullptr) {  // NT-Xent's rows that are not unit: v and wc both defined
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) p[j] = exp_tile(si * wc[j] * p[j] - shift) * (ui + v[j]) * (wi * wc[j]);
    } else if (v != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) p[j] = exp_tile(si * p[j] - shift) * (ui + v[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) p[j] = exp_tile(si * p[j] - shift) * ui;
    }
    if (left_out(i, drop, c)) p[i + drop] = 0;
  }
}

// t's data as T* (nullptr when undefined), after a contiguous copy in s's dtype kept alive in hold.
template <class T>
const T* scales_ptr(const at::Tensor& t, const at::Tensor& s, int64_t n, at::Tensor& hold) {
  if (!t.defined()) return nullptr;
  hold = t.to(s.scalar_type()).contiguous();
  TORCH_INTERNAL_ASSERT(hold.numel() == n);
  return hold.data_ptr<T>();
}

void check_tile(const at::Tensor& s) {
  TORCH_INTERNAL_ASSERT(s.is_contiguous() && s.dim() == 2 &&
                        (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble));
}

}  // namespace

void exp_sums(const at::Tensor& s, double scale, double shift, int64_t drop, const TileOut& out, const at::Tensor& w,
              const at::Tensor& w_cols) {
  check_tile(s);
  const int64_t r = s.size(0), c = s.size(1);
  const bool cols = out.cols.defined();
  TORCH_INTERNAL_ASSERT(out.op == Combine::kSum && out.rows.is_contiguous() && out.rows.numel() == r &&
                        out.rows.scalar_type() == s.scalar_type() &&
                        (!cols || (out.cols.is_contiguous() && out.cols.numel() == c)));
  at::Tensor hold_w, hold_wc;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "exp_sums", [&] {
    exp_sums_rows(s.const_data_ptr<scalar_t>(), r, c, static_cast<scalar_t>(scale), static_cast<scalar_t>(shift), drop,
                  out.rows.data_ptr<scalar_t>(), cols ? out.cols.data_ptr<scalar_t>() : nullptr,
                  scales_ptr<scalar_t>(w, s, r, hold_w), scales_ptr<scalar_t>(w_cols, s, c, hold_wc));
  });
}

void exp_weights(at::Tensor& s, double scale, double shift, const at::Tensor& u, const at::Tensor& v, int64_t drop,
                 const at::Tensor& w, const at::Tensor& w_cols) {
  check_tile(s);
  const int64_t r = s.size(0), c = s.size(1);
  TORCH_INTERNAL_ASSERT(!w_cols.defined() || v.defined());
  at::Tensor hold_u, hold_v, hold_w, hold_wc;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "exp_weights", [&] {
    exp_weights_rows(s.data_ptr<scalar_t>(), r, c, static_cast<scalar_t>(scale), static_cast<scalar_t>(shift),
                     scales_ptr<scalar_t>(u, s, r, hold_u), scales_ptr<scalar_t>(v, s, c, hold_v), drop,
                     scales_ptr<scalar_t>(w, s, r, hold_w), scales_ptr<scalar_t>(w_cols, s, c, hold_wc));
  });
}

}  // namespace fastssl
