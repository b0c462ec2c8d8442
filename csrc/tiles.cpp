// The elementwise passes of the tile kernels (csrc/tiles.h: score_max, exp_sums, exp_weights).
//
// One pass per tile, vectorised on a baseline-ISA build through csrc/cpu/vec_math.h (clones per x86-64
// level, Cephes' expf for fp32; fp64, for gradcheck, uses std::exp). The row sums take kLanes
// partial sums in a fixed order, so every clone gives the same bits.
#include <ATen/ATen.h>

#include <limits>

#include "cpu/vec_math.h"
#include "tiles.h"

namespace fastssl {
namespace {

bool left_out(int64_t i, int64_t drop, int64_t c) { return drop != kKeepAll && i + drop >= 0 && i + drop < c; }

// The optional row and column scales w, wc (nullptr: 1) enter the exponent as x_ij = scale w_i wc_j s_ij.
// The shift is one number for every pair (rs, cs nullptr: e_ij = exp(x_ij - shift) feeds row i and
// column j alike) or per row and per column (row i sums exp(x_ij - rs_i), column j exp(x_ij - cs_j):
// two exponentials per pair).
// The four loops are spelled out: a generic lambda around them (one instance per column scale, as
// score_max_rows does for its short loop) was not inlined, and a lambda is not cloned per ISA
// (FASTSSL_ROW_KERNEL), so every clone called baseline code (`nm -C` of the extension shows a lambda
// that was not inlined as a symbol of its own; it shows none for these row kernels).
// One pass per row, kLanes columns at a time: each e_ij goes into the row's partial sums (a register)
// and the column sum, and is not stored (the sums are all the forward needs), so the tile is read once.
// The sums are added to row and col.
template <class T>
FASTSSL_ROW_KERNEL void exp_sums_rows(const T* s, int64_t r, int64_t c, T scale, T shift, const T* rs, const T* cs,
                                      int64_t drop, T* row, T* col, const T* w, const T* wc) {
  for (int64_t i = 0; i < r; ++i) {
    const T* p = s + i * c;
    const T si = w != nullptr ? scale * w[i] : scale;
    const T shift_i = rs != nullptr ? rs[i] : shift;
    // the left-out pair is zeroed before the sums: subtracting it after would cancel the row's small terms
    const int64_t skip = left_out(i, drop, c) ? i + drop : -1;
    // one chunk of e_ij (and of the column's e'_ij with column shifts), for j0 <= j < j0 + n; aligned,
    // so that reading it back as one vector is forwarded from the stores (a misaligned 64-byte reload
    // stalls on them)
    alignas(sizeof(Lanes<T>)) T e[kLanes];
    alignas(sizeof(Lanes<T>)) T e_col[kLanes];
    const auto chunk = [&](int64_t j0, int64_t n) {
      if (wc != nullptr) {
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) e[l] = exp_tile(si * wc[j0 + l] * p[j0 + l] - shift_i);
      } else {
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) e[l] = exp_tile(si * p[j0 + l] - shift_i);
      }
      if (j0 <= skip && skip < j0 + n) e[skip - j0] = 0;
      if (col == nullptr) return;
      if (cs == nullptr) {
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) col[j0 + l] += e[l];
        return;
      }
      if (wc != nullptr) {
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) e_col[l] = exp_tile(si * wc[j0 + l] * p[j0 + l] - cs[j0 + l]);
      } else {
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) e_col[l] = exp_tile(si * p[j0 + l] - cs[j0 + l]);
      }
      if (j0 <= skip && skip < j0 + n) e_col[skip - j0] = 0;
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) col[j0 + l] += e_col[l];
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

// As exp_sums_rows, times (u_i + v_j) and, with scales, w_i wc_j; with per-row and per-column shifts,
// a_ij = (u_i exp(x_ij - rs_i) + v_j exp(x_ij - cs_j)) w_i wc_j.
template <class T>
FASTSSL_ROW_KERNEL void exp_weights_rows(T* a, int64_t r, int64_t c, T scale, T shift, const T* rs, const T* cs,
                                         const T* u, const T* v, int64_t drop, const T* w, const T* wc) {
  for (int64_t i = 0; i < r; ++i) {
    T* p = a + i * c;
    const T ui = u[i];
    const T wi = w != nullptr ? w[i] : T(1);
    const T si = scale * wi;
    if (rs != nullptr) {
      const T ri = rs[i];
      if (wc != nullptr) {  // NT-Xent's rows that are not unit: v, cs and wc all defined
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          const T x = si * wc[j] * p[j];
          p[j] = (ui * exp_tile(x - ri) + v[j] * exp_tile(x - cs[j])) * (wi * wc[j]);
        }
      } else if (v != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) p[j] = ui * exp_tile(si * p[j] - ri) + v[j] * exp_tile(si * p[j] - cs[j]);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) p[j] = ui * exp_tile(si * p[j] - ri);
      }
    } else if (wc != nullptr) {  // NT-Xent's rows that are not unit: v and wc both defined
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

// Row and column maxima of x_ij = scale w_i wc_j s_ij (max is exact in any order), the left-out pair
// not counted; col may be nullptr.
template <class T>
FASTSSL_ROW_KERNEL void score_max_rows(const T* s, int64_t r, int64_t c, T scale, int64_t drop, T* row, T* col,
                                       const T* w, const T* wc) {
  const T lowest = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < r; ++i) {
    const T* p = s + i * c;
    const T si = w != nullptr ? scale * w[i] : scale;
    const int64_t skip = left_out(i, drop, c) ? i + drop : -1;
    T m = row[i];
    const auto sweep = [&](auto scale_of) {  // one instance per kind of column scale, so each vectorises
      if (col != nullptr) {
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < c; ++j) {
          const T x = j == skip ? lowest : si * scale_of(j) * p[j];
          m = m > x ? m : x;
          col[j] = col[j] > x ? col[j] : x;
        }
      } else {
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < c; ++j) {
          const T x = j == skip ? lowest : si * scale_of(j) * p[j];
          m = m > x ? m : x;
        }
      }
    };
    if (wc != nullptr) {
      sweep([&](int64_t j) { return wc[j]; });
    } else {
      sweep([](int64_t) { return T(1); });
    }
    row[i] = m;
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

void score_max(const at::Tensor& s, double scale, int64_t drop, const TileOut& out, const at::Tensor& w,
               const at::Tensor& w_cols) {
  check_tile(s);
  const int64_t r = s.size(0), c = s.size(1);
  const bool cols = out.cols.defined();
  TORCH_INTERNAL_ASSERT(out.op == Combine::kMax && out.rows.is_contiguous() && out.rows.numel() == r &&
                        out.rows.scalar_type() == s.scalar_type() &&
                        (!cols || (out.cols.is_contiguous() && out.cols.numel() == c)));
  at::Tensor hold_w, hold_wc;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "score_max", [&] {
    score_max_rows(s.const_data_ptr<scalar_t>(), r, c, static_cast<scalar_t>(scale), drop,
                   out.rows.data_ptr<scalar_t>(), cols ? out.cols.data_ptr<scalar_t>() : nullptr,
                   scales_ptr<scalar_t>(w, s, r, hold_w), scales_ptr<scalar_t>(w_cols, s, c, hold_wc));
  });
}

void exp_sums(const at::Tensor& s, double scale, const Shift& shift, int64_t drop, const TileOut& out,
              const at::Tensor& w, const at::Tensor& w_cols) {
  check_tile(s);
  const int64_t r = s.size(0), c = s.size(1);
  const bool cols = out.cols.defined();
  TORCH_INTERNAL_ASSERT(out.op == Combine::kSum && out.rows.is_contiguous() && out.rows.numel() == r &&
                        out.rows.scalar_type() == s.scalar_type() &&
                        (!cols || (out.cols.is_contiguous() && out.cols.numel() == c)));
  TORCH_INTERNAL_ASSERT(!shift.rows.defined() || !cols || shift.cols.defined());
  at::Tensor hold_w, hold_wc, hold_rs, hold_cs;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "exp_sums", [&] {
    exp_sums_rows(s.const_data_ptr<scalar_t>(), r, c, static_cast<scalar_t>(scale), static_cast<scalar_t>(shift.fixed),
                  scales_ptr<scalar_t>(shift.rows, s, r, hold_rs), cols ? scales_ptr<scalar_t>(shift.cols, s, c, hold_cs) : nullptr,
                  drop, out.rows.data_ptr<scalar_t>(), cols ? out.cols.data_ptr<scalar_t>() : nullptr,
                  scales_ptr<scalar_t>(w, s, r, hold_w), scales_ptr<scalar_t>(w_cols, s, c, hold_wc));
  });
}

void exp_weights(at::Tensor& s, double scale, const Shift& shift, const at::Tensor& u, const at::Tensor& v,
                 int64_t drop, const at::Tensor& w, const at::Tensor& w_cols) {
  check_tile(s);
  const int64_t r = s.size(0), c = s.size(1);
  TORCH_INTERNAL_ASSERT(!w_cols.defined() || v.defined());
  TORCH_INTERNAL_ASSERT(!shift.rows.defined() || !v.defined() || shift.cols.defined());
  at::Tensor hold_u, hold_v, hold_w, hold_wc, hold_rs, hold_cs;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "exp_weights", [&] {
    exp_weights_rows(s.data_ptr<scalar_t>(), r, c, static_cast<scalar_t>(scale), static_cast<scalar_t>(shift.fixed),
                     scales_ptr<scalar_t>(shift.rows, s, r, hold_rs),
                     v.defined() ? scales_ptr<scalar_t>(shift.cols, s, c, hold_cs) : nullptr,
                     scales_ptr<scalar_t>(u, s, r, hold_u), scales_ptr<scalar_t>(v, s, c, hold_v), drop,
                     scales_ptr<scalar_t>(w, s, r, hold_w), scales_ptr<scalar_t>(w_cols, s, c, hold_wc));
  });
}

}  // namespace fastssl
