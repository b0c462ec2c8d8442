// SigLIP on the CPU: the per-row sums of the pairwise sigmoid losses and their gradient, without
// an M x N matrix (docs/design.md, "SigLIP").
//
// For unit rows x_i (M x D: images), y_j (N x D: texts), s_ij = x_i . y_j, the logits
// l_ij = scale s_ij + bias and the labels z_ij = +1 on the positives j = i + offset, -1 elsewhere,
//   row_i = -sum_j log sigmoid(z_ij l_ij) = sum_j softplus(-z_ij l_ij).                         (1)
// No normaliser couples the pairs, so one pass forward and one backward suffice. With
// g_i = dL/drow_i and A_ij = g_i d softplus(-z_ij l_ij)/dl_ij = -g_i z_ij sigmoid(-z_ij l_ij),
//   dL/dx_i = scale sum_j A_ij y_j,   dL/dy_j = scale sum_i A_ij x_i,                            (2)
//   dL/dscale = sum_ij A_ij s_ij = sum_i x_i . (A Y)_i,   dL/dbias = sum_ij A_ij,                (3)
// both from the fp32 (fp64) accumulators of (2), before anything is rounded to the input dtype.
// Stable terms: softplus(v) = max(v, 0) + log1p(exp(-|v|)) and sigmoid(v) = 1/(1 + e) for v >= 0,
// e/(1 + e) below, e = exp(-|v|): nothing overflows, and log1p keeps the digits of a small e (at the
// default bias -10 a negative pair has e ~ 4.5e-5), csrc/cpu/vec_math.h.
//
// Each tile is one GEMM of the scores s_ij into a per-thread buffer, then one pass per row that does
// all the elementwise work (scale and bias, labels, softplus or A, the row sum) while the row is in
// cache; the backward's two GEMMs then read A from the same buffer. For a mean or sum loss the
// upstream gradient is one number, so siglip_fused_cpu takes the loss and the gradients at g = 1 in
// one pass (three GEMMs per tile instead of four over forward and backward), and the backward only
// scales them (fastssl/ops/siglip.py). The positive j = i + offset is
// the one column whose sign flips: the row loops run on the columns either side of it.
//
// Threads and memory: fastssl::reduce_tiles (csrc/tiles.h): a tile per thread and per-thread row
// partials of at most 64 MiB; never M x N.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "../tiles.h"
#include "vec_math.h"

namespace {

using fastssl::Combine;
using fastssl::exp_tile;
using fastssl::kTile;
using fastssl::lane_sum;
using fastssl::log1p_tile;
using fastssl::reduce_tiles;
using fastssl::unit_rows;

template <class T>
T softplus(T v) {
  return std::max(v, T(0)) + log1p_tile(exp_tile(-std::abs(v)));
}

template <class T>
T sigmoid(T v) {
  const T e = exp_tile(-std::abs(v)), r = T(1) / (T(1) + e), er = e * r;
  return v >= T(0) ? r : er;
}

// The negatives' terms of a tile row r[0:n] (scores in, terms out) and their sum:
// softplus(l) for (1), g sigmoid(l) = A for (2), l = scale r_j + bias.
template <class T>
FASTSSL_ROW_KERNEL T softplus_row(T* r, int64_t n, T scale, T bias) {
  for (int64_t j = 0; j < n; ++j) r[j] = softplus(scale * r[j] + bias);
  return lane_sum(r, n);
}
template <class T>
FASTSSL_ROW_KERNEL T sigmoid_row(T* r, int64_t n, T scale, T bias, T g) {
  for (int64_t j = 0; j < n; ++j) r[j] = g * sigmoid(scale * r[j] + bias);
  return lane_sum(r, n);
}

// Both at once, for g = 1: A_ij = sigmoid(l) in place and softplus(l) summed, from one exp per pair.
template <class T>
FASTSSL_ROW_KERNEL T softplus_sigmoid_row(T* r, T* terms, int64_t n, T scale, T bias, T& a_sum) {
  for (int64_t j = 0; j < n; ++j) {
    const T v = scale * r[j] + bias, e = exp_tile(-std::abs(v)), q = T(1) / (T(1) + e);
    terms[j] = std::max(v, T(0)) + log1p_tile(e);
    r[j] = v >= T(0) ? q : e * q;
  }
  a_sum += lane_sum(r, n);
  return lane_sum(terms, n);
}

// negatives(a, b) on the columns [a, b) of a tile row of width n other than its positive column jd
// (if 0 <= jd < n), plus positive(jd): the sum of the row's terms.
template <class T, class Negatives, class Positive>
T around_positive(int64_t n, int64_t jd, Negatives negatives, Positive positive) {
  if (jd < 0 || jd >= n) return negatives(0, n);
  return negatives(0, jd) + positive(jd) + negatives(jd + 1, n);
}

struct Inputs {
  at::Tensor x, y;
  double scale, bias;
};

Inputs inputs(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& bias,
              const char* fn) {
  Inputs in{unit_rows(x_in, fn, "x"), unit_rows(y_in, fn, "y"), 0.0, 0.0};
  TORCH_CHECK(in.x.size(1) == in.y.size(1) && in.x.scalar_type() == in.y.scalar_type(), fn,
              ": x and y must have the same D and dtype");
  TORCH_CHECK(scale.numel() == 1 && bias.numel() == 1, fn, ": scale and bias must have one element");
  // CPU tensors: their values are read here without a device sync
  in.scale = scale.item<double>();
  in.bias = bias.item<double>();
  return in;
}

// One buffer of `elems` values per thread of reduce_tiles; view(r, c) is the calling thread's, as a
// contiguous [r, c] tensor (r c <= elems).
struct ThreadBuffers {
  std::vector<at::Tensor> flat;
  ThreadBuffers(int64_t elems, const at::TensorOptions& options) {
    for (int64_t t = 0; t < at::get_num_threads(); ++t) flat.push_back(at::empty({elems}, options));
  }
  at::Tensor view(int64_t r, int64_t c) const { return flat[at::get_thread_num()].narrow(0, 0, r * c).view({r, c}); }
};

// s = x[i0:i1] y[j0:j1]^T into the calling thread's score buffer
at::Tensor scores(const ThreadBuffers& buf, const Inputs& in, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  at::Tensor s = buf.view(i1 - i0, j1 - j0);
  at::mm_out(s, in.x.slice(0, i0, i1), in.y.slice(0, j0, j1).t());
  return s;
}

}  // namespace

at::Tensor siglip_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale,
                          const at::Tensor& bias, int64_t offset) {
  const Inputs in = inputs(x_in, y_in, scale, bias, "siglip_fwd_cpu");
  const int64_t m = in.x.size(0), n = in.y.size(0);
  at::Tensor rows = at::zeros({m, 1}, in.x.options());
  at::Tensor no_cols;
  const ThreadBuffers s_buf(kTile * kTile, in.x.options()), row_buf(kTile, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "siglip_fwd_cpu", [&] {
    using T = scalar_t;
    const T sc = T(in.scale), bi = T(in.bias);
    reduce_tiles(m, n, rows, no_cols, Combine::kSum, 0.0, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1, const fastssl::TileOut& parts) {
      const at::Tensor s = scores(s_buf, in, i0, i1, j0, j1);
      const at::Tensor part = row_buf.view(i1 - i0, 1);
      const int64_t nc = j1 - j0;
      T* ps = s.data_ptr<T>();
      T* out = part.data_ptr<T>();
      for (int64_t i = 0; i < i1 - i0; ++i) {
        T* r = ps + i * nc;
        // (1): softplus(l_ij) on the negatives (z = -1), in place, then their sum
        const auto negatives = [&](int64_t a, int64_t b) { return softplus_row(r + a, b - a, sc, bi); };
        const auto positive = [&](int64_t j) { return softplus(-(sc * r[j] + bi)); };
        out[i] = around_positive<T>(nc, i0 + i + offset - j0, negatives, positive);
      }
      parts.combine(part, at::Tensor());
    });
  });
  return rows.squeeze(1);
}

namespace {

// (2) and (3) for g = grad_row, or, when grad_row is undefined, for g_i = 1 with the row sums (1)
// taken from the same scores (siglip_fused_cpu): then (row_i, dx, dy, dscale, dbias), else row_i
// undefined. rows: (A Y)_i in columns 0..D-1, sum_j A_ij in column D, row_i in column D + 1.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_grads(
    const at::Tensor& grad_row, const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale,
    const at::Tensor& bias, int64_t offset, const char* fn) {
  const Inputs in = inputs(x_in, y_in, scale, bias, fn);
  const int64_t m = in.x.size(0), n = in.y.size(0), d = in.x.size(1);
  const bool fused = !grad_row.defined();
  TORCH_CHECK(fused || grad_row.numel() == m, fn, ": grad_row must have ", m, " elements");
  const at::Tensor g = fused ? at::Tensor() : grad_row.to(in.x.scalar_type()).contiguous();
  at::Tensor rows = at::zeros({m, d + 2}, in.x.options());
  at::Tensor cols = at::zeros({n, d}, in.x.options());
  const ThreadBuffers a_buf(kTile * kTile, in.x.options()), row_buf(kTile * (d + 2), in.x.options()),
      col_buf(kTile * d, in.x.options()), term_buf(fused ? kTile : 1, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "siglip_grads", [&] {
    using T = scalar_t;
    const T sc = T(in.scale), bi = T(in.bias);
    const T* pg = fused ? nullptr : g.const_data_ptr<T>();
    reduce_tiles(m, n, rows, cols, Combine::kSum, 0.0, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1, const fastssl::TileOut& parts) {
      const at::Tensor a = scores(a_buf, in, i0, i1, j0, j1);
      at::Tensor row_part = row_buf.view(i1 - i0, d + 2), col_part = col_buf.view(j1 - j0, d);
      const int64_t nc = j1 - j0;
      T* pa = a.data_ptr<T>();
      T* row_sum = row_part.data_ptr<T>() + d;
      T* terms = term_buf.view(1, fused ? nc : 1).data_ptr<T>();
      for (int64_t i = 0; i < i1 - i0; ++i) {
        T* r = pa + i * nc;
        const int64_t jd = i0 + i + offset - j0;
        if (fused) {  // g_i = 1: A and the loss terms from the same exponential
          T a_sum = 0;
          const auto negatives = [&](int64_t a, int64_t b) {
            return softplus_sigmoid_row(r + a, terms, b - a, sc, bi, a_sum);
          };
          const auto positive = [&](int64_t j) {
            const T v = -(sc * r[j] + bi);
            r[j] = -sigmoid(v);
            a_sum += r[j];
            return softplus(v);
          };
          row_sum[i * (d + 2) + 1] = around_positive<T>(nc, jd, negatives, positive);
          row_sum[i * (d + 2)] = a_sum;
          continue;
        }
        const T gi = pg[i0 + i];
        // (2): A_ij = g_i sigmoid(l_ij) on the negatives, -g_i sigmoid(-l_ij) on the positive, in place
        const auto negatives = [&](int64_t a, int64_t b) { return sigmoid_row(r + a, b - a, sc, bi, gi); };
        const auto positive = [&](int64_t j) { return r[j] = -gi * sigmoid(-(sc * r[j] + bi)); };
        row_sum[i * (d + 2)] = around_positive<T>(nc, jd, negatives, positive);
        row_sum[i * (d + 2) + 1] = 0;
      }
      at::Tensor ay = row_part.narrow(1, 0, d);
      at::mm_out(ay, a, in.y.slice(0, j0, j1));
      at::mm_out(col_part, a.t(), in.x.slice(0, i0, i1));
      parts.combine(row_part, col_part);
    });
  });
  const at::Tensor ay = rows.narrow(1, 0, d);
  at::Tensor grad_scale = (in.x * ay).sum();                  // (3)
  at::Tensor grad_bias = rows.narrow(1, d, 1).sum();          // (3)
  at::Tensor dx = (ay * in.scale).to(x_in.scalar_type());     // (2)
  at::Tensor dy = cols.mul_(in.scale).to(y_in.scalar_type());  // (2)
  at::Tensor row = fused ? rows.select(1, d + 1).contiguous() : at::Tensor();
  return {row, dx, dy, grad_scale, grad_bias};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_cpu(const at::Tensor& grad_row,
                                                                          const at::Tensor& x_in,
                                                                          const at::Tensor& y_in,
                                                                          const at::Tensor& scale,
                                                                          const at::Tensor& bias, int64_t offset) {
  TORCH_CHECK(grad_row.defined(), "siglip_bwd_cpu: grad_row must be a tensor");
  auto [row, dx, dy, grad_scale, grad_bias] = siglip_grads(grad_row, x_in, y_in, scale, bias, offset, "siglip_bwd_cpu");
  return {dx, dy, grad_scale, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_fused_cpu(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& bias, int64_t offset) {
  return siglip_grads(at::Tensor(), x_in, y_in, scale, bias, offset, "siglip_fused_cpu");
}
