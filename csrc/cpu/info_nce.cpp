// InfoNCE with two towers (MoCo, CLIP) on the CPU: the row and column log-sum-exps of
// S = Q K^T / tau, without holding S.
//
// For unit rows q_i (M x D), k_j (N x D: the keys, then any extra negatives) and s_ij = q_i . k_j / tau,
//   row_i = log sum_j exp(s_ij),   col_j = log sum_i exp(s_ij)                                   (1)
// are the only parts of InfoNCE and of the symmetric CLIP loss that need all M N pairs; the
// positive term s_ii is O(M D) and lives in fastssl/ops/info_nce.py. With self_offset >= 0 the
// pairs (i, i + self_offset) are left out of both sums (NT-Xent rows against every rank's rows,
// where column i + self_offset is row i itself). Given g_i = dL/drow_i, h_j = dL/dcol_j,
// P_ij = exp(s_ij - row_i) and C_ij = exp(s_ij - col_j),
//   A_ij = g_i P_ij + h_j C_ij,   dL/dq_i = (1/tau) sum_j A_ij k_j,   dL/dk_j = (1/tau) sum_i A_ij q_i.  (2)
// s is linear in 1/tau, so dL/d(1/tau) = sum_ij A_ij q_i . k_j = sum_i q_i . (A K)_i, from the
// fp32 rows of (2) before they are rounded to the input dtype.                                  (3)
//
// Fixed shift (docs/design.md, "Tile kernels"): rows are unit vectors, so s_ij <= m = 1/tau, and e_ij = exp(s_ij - m)
// feeds row i and column j alike; backward, P_ij = e_ij c_i and C_ij = e_ij d_j with
// c_i = exp(m - row_i), d_j = exp(m - col_j), so A_ij = e_ij (g_i c_i + h_j d_j): one exponential
// per pair in (1) and in (2). Every e_ij >= exp(-2/tau) stays a normal float while 2/tau <= 80,
// and c_i, d_j <= exp(2/tau) stay finite. Beyond that (tau < 0.025) a first pass finds each row's
// and column's max s_ij and (1) uses those shifts; (2) then takes P and C from their own
// exponentials (two per pair, in the same elementwise pass: fastssl::Shift).
//
// bf16 rows: the tile products run on bf16 micro-kernels with fp32 accumulation where the CPU has
// them (fastssl::TileProducts): S exactly, since the rows are bf16 numbers, and A K with A split into
// two bf16 parts (rounding A to bf16 alone would put a 2^-9 relative error on A K, which the positive
// term nearly cancels when the softmax is peaked: dL/d(1/tau) was off by 1.5e-3 at tau = 0.01).
//
// Threads: see reduce_tiles. Work memory: a tile per thread and per-thread row partials of at
// most 64 MiB in all (beyond that the rows are processed in blocks); never M x N.
#include <ATen/ATen.h>

#include <limits>
#include <tuple>

#include "../ops.h"
#include "../tiles.h"

namespace {

using fastssl::Combine;
using fastssl::fixed_shift_is_exact;
using fastssl::reduce_tiles;
using fastssl::tile_shift;
using fastssl::unit_rows;

// Rows read from bf16: where the micro-kernels are missing, the forward's tile products may still take
// oneDNN's bf16 dot products (fastssl::Bf16Dots).
bool bf16_rows(const at::Tensor& q, const at::Tensor& k) {
  return q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16;
}

// The left-out pair's column offset in tile (i0.., j0..) for fastssl::exp_sums / exp_weights.
int64_t tile_drop(int64_t self_offset, int64_t i0, int64_t j0) {
  return self_offset >= 0 ? i0 + self_offset - j0 : fastssl::kKeepAll;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> info_nce_lse_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        double inv_tau, bool with_cols, int64_t self_offset) {
  const at::Tensor q = unit_rows(q_in, "info_nce_lse_fwd_cpu", "q");
  const at::Tensor k = unit_rows(k_in, "info_nce_lse_fwd_cpu", "k");
  TORCH_CHECK(q.size(1) == k.size(1) && q.scalar_type() == k.scalar_type(),
              "info_nce_lse_fwd_cpu: q and k must have the same D and dtype");
  const int64_t m = q.size(0), n = k.size(0);
  const bool fixed = fixed_shift_is_exact(inv_tau);
  const fastssl::TileProducts products(q, k, false);
  const fastssl::Bf16Dots dots(!products.bf16() && bf16_rows(q_in, k_in));
  // shift of row i and column j: m for all (fixed), or the row's / column's own max s
  at::Tensor row_shift = at::full({m, 1}, inv_tau, q.options());
  at::Tensor col_shift = with_cols ? at::full({n, 1}, inv_tau, q.options()) : at::Tensor();
  if (!fixed) {
    const double lowest = -std::numeric_limits<double>::infinity();
    row_shift.fill_(lowest);
    if (with_cols) col_shift.fill_(lowest);
    reduce_tiles(m, n, row_shift, col_shift, Combine::kMax, lowest,
                 [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1, const fastssl::TileOut& parts) {
                   fastssl::score_max(products.scores(i0, i1, j0, j1, 1.0), inv_tau, tile_drop(self_offset, i0, j0),
                                      parts);
                 });
  }
  at::Tensor row_sums = at::zeros({m, 1}, q.options());
  at::Tensor col_sums = with_cols ? at::zeros({n, 1}, q.options()) : at::Tensor();
  reduce_tiles(m, n, row_sums, col_sums, Combine::kSum, 0.0,
               [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1, const fastssl::TileOut& parts) {
                 // fixed shift: e_ij is the same number for row i and for column j, summed both ways in
                 // one pass (the scale 1/tau applied there); else row i and column j take their own max
                 const at::Tensor s = products.scores(i0, i1, j0, j1, 1.0);
                 fastssl::exp_sums(s, inv_tau, tile_shift(fixed, inv_tau, row_shift, col_shift, i0, i1, j0, j1),
                                   tile_drop(self_offset, i0, j0), parts);
               });
  at::Tensor row_lse = (row_shift + row_sums.log()).squeeze(1);
  at::Tensor col_lse = with_cols ? (col_shift + col_sums.log()).squeeze(1) : at::empty({0}, q.options());
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_lse_bwd_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& row_lse_in, const at::Tensor& col_lse_in, double inv_tau, int64_t self_offset) {
  const at::Tensor q = unit_rows(q_in, "info_nce_lse_bwd_cpu", "q");
  const at::Tensor k = unit_rows(k_in, "info_nce_lse_bwd_cpu", "k");
  const int64_t m = q.size(0), n = k.size(0);
  const bool with_cols = col_lse_in.numel() > 0;
  TORCH_CHECK(grad_row.numel() == m && row_lse_in.numel() == m,
              "info_nce_lse_bwd_cpu: grad_row and row_lse must have ", m, " elements");
  TORCH_CHECK(!with_cols || (grad_col.numel() == n && col_lse_in.numel() == n),
              "info_nce_lse_bwd_cpu: grad_col and col_lse must have ", n, " elements");
  const auto as_acc = [&](const at::Tensor& v) { return v.to(q.scalar_type()).contiguous(); };
  const at::Tensor g = as_acc(grad_row), row_lse = as_acc(row_lse_in);
  const at::Tensor h = with_cols ? as_acc(grad_col) : at::Tensor();
  const at::Tensor col_lse = with_cols ? as_acc(col_lse_in) : at::Tensor();
  const bool fixed = fixed_shift_is_exact(inv_tau);
  // fixed shift: A_ij = e_ij (u_i + v_j) with u_i = g_i c_i, v_j = h_j d_j; else
  // A_ij = g_i exp(s_ij - row_i) + h_j exp(s_ij - col_j), u = g and v = h
  const at::Tensor u = fixed ? g * (inv_tau - row_lse).exp() : g;
  const at::Tensor v = !with_cols ? at::Tensor() : fixed ? h * (inv_tau - col_lse).exp() : h;
  const fastssl::TileProducts products(q, k, true);
  at::Tensor dq = at::zeros({m, q.size(1)}, q.options());
  at::Tensor dk = products.cols_like(n);
  reduce_tiles(m, n, dq, dk, Combine::kSum, 0.0, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                                                      const fastssl::TileOut& parts) {
    at::Tensor a = products.scores(i0, i1, j0, j1, 1.0);  // (s), then A of (2) in place
    fastssl::exp_weights(a, inv_tau, tile_shift(fixed, inv_tau, row_lse, col_lse, i0, i1, j0, j1), u.slice(0, i0, i1),
                         with_cols ? v.slice(0, j0, j1) : at::Tensor(), tile_drop(self_offset, i0, j0));
    products.weighted(a, i0, i1, j0, j1, parts);
  });
  at::Tensor grad_inv_tau = (q * dq).sum();  // (3)
  return {dq.mul_(inv_tau).to(q_in.scalar_type()), dk.mul_(inv_tau).to(k_in.scalar_type()).contiguous(), grad_inv_tau};
}
