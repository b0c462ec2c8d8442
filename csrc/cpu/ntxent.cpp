// NT-Xent on the CPU: the row log-sum-exp of the self-similarity matrix, without holding it.
//
// For unit rows z_i (N x D) and s_ij = z_i . z_j / tau,
//   lse_i = log sum_{j != i} exp(s_ij)                                            (1)
// is the only part of the NT-Xent / SupCon loss that needs all N^2 pairs; the positive term is
// O(N D) and lives in fastssl/ops/ntxent.py. Given g_i = dL/dlse_i and P_ij = exp(s_ij - lse_i),
//   dL/dz_i = (1/tau) sum_j (g_i P_ij + g_j P_ji) z_j.                             (2)
// The kernels get z_i = r_i x_i as rows x and inverse norms r (x is the input's own numbers, which
// are bf16 numbers for bf16 input: TileProducts multiplies them exactly on bf16 dot products), so
// the tiles hold x_i . x_j and r_i r_j enters the exponential pass; the backward returns
// dL/dx_i = r_i dL/dz_i (docs/design.md, "bf16 dot products on the CPU").
//
// Two facts shape the kernel (Chen et al. 2020, SimCLR; docs/design.md, "Tile kernels"):
//  a. S is symmetric, so only tiles (I, J) with J >= I are visited. One tile feeds the row sums
//     of I and of J in (1), and the gradients of I and of J in (2), through A = A^T where
//     A_ij = g_i P_ij + g_j P_ji: grad_I += A Z_J and grad_J += A^T Z_I.
//  b. Rows are unit vectors, so s_ij <= 1/tau =: m. With the fixed shift m no running max is
//     needed and e_ij = exp(s_ij - m) serves row i and row j alike. Every e_ij >= exp(-2/tau)
//     stays a normal float while 2/tau <= 80; beyond that (tau < 0.025) rows whose every
//     neighbour is far away would underflow, so a first pass finds each row's max s_ij and
//     the sums use that per-row shift (two exponentials per pair instead of one, in the same
//     elementwise pass: fastssl::exp_sums / exp_weights with a fastssl::Shift per row).
//
// Threads: stripes I and T-1-I are processed together, column by column, the columns J shared among
// threads (reduce_upper_tiles). Rows of J are then written by one thread only; rows of the stripes go
// to per-thread partials that are reduced after them. Work memory is O(threads * tile * (tile + D)),
// never N x N.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <atomic>
#include <limits>

#include "../ops.h"
#include "../tiles.h"

namespace {

using fastssl::Combine;
using fastssl::combine_into;
using fastssl::fixed_shift_is_exact;

constexpr int64_t kTile = 256;

// Visits every tile (I, J), J >= I, of the N x N matrix over rows of z: tile(i0, i1, j0, j1,
// diagonal, parts) accumulates into parts (fastssl::TileOut) its part for rows i0..i1 and, off the
// diagonal, for rows j0..j1 of out (N x K). A diagonal tile has no column part (parts.cols
// undefined): its row part already covers both orders of every pair in the tile.
//
// Stripes I and T - 1 - I share one parallel region (T + 1 tiles between them, whatever I), so that
// a region's last tile leaves less of a thread idle than a stripe's shrinking tail did. Threads take
// columns J from a shared counter, last column first; a column carries the tiles (I, J) of both
// stripes, so the rows j0..j1 of out are written by one thread alone; rows of the stripes go to
// per-thread partials, reduced after the region.
template <class TileFn>
void reduce_upper_tiles(int64_t n, at::Tensor& out, Combine op, double identity, TileFn tile) {
  const int64_t num_tiles = (n + kTile - 1) / kTile;
  const int64_t num_threads = at::get_num_threads();
  for (int64_t lo = 0, hi = num_tiles - 1; lo <= hi; ++lo, --hi) {
    const int64_t stripes[2] = {lo, hi}, count = lo == hi ? 1 : 2;
    // the rows of both stripes, stacked: stripe s's rows start at offset[s] in the partials
    int64_t rows_of[2], offset[2] = {0, 0};
    for (int64_t k = 0; k < count; ++k) rows_of[k] = std::min(n, (stripes[k] + 1) * kTile) - stripes[k] * kTile;
    offset[1] = rows_of[0];
    at::Tensor partial = at::full({num_threads, offset[count - 1] + rows_of[count - 1], out.size(1)}, identity,
                                  out.options());
    std::atomic<int64_t> next{num_tiles - 1};
    const at::ThreadLocalState caller;  // dispatch state (below autograd, grad mode) for the workers
    at::parallel_for(0, num_threads, 1, [&](int64_t slot, int64_t) {
      at::ThreadLocalStateGuard guard(caller);
      const fastssl::FlushDenormals flush;  // denormals: csrc/cpu/vec_math.h
      at::Tensor mine = partial[slot];
      for (int64_t J = next--; J >= lo; J = next--) {
        const int64_t j0 = J * kTile, j1 = std::min(n, j0 + kTile);
        for (int64_t k = 0; k < count; ++k) {
          const int64_t I = stripes[k];
          if (J < I) continue;
          tile(I * kTile, I * kTile + rows_of[k], j0, j1, I == J,
               fastssl::TileOut{mine.narrow(0, offset[k], rows_of[k]),
                                I == J ? at::Tensor() : out.narrow(0, j0, j1 - j0), op});
        }
      }
      fastssl::release_tile_products();
    });
    const at::Tensor total = op == Combine::kSum ? partial.sum(0) : std::get<0>(partial.max(0));
    for (int64_t k = 0; k < count; ++k) {
      combine_into(out.narrow(0, stripes[k] * kTile, rows_of[k]), total.narrow(0, offset[k], rows_of[k]), op);
    }
  }
}

// max_{j != i} s_ij for every row, s_ij = inv_tau r_i r_j x_i . x_j: the per-row shift when the fixed
// one may underflow.
at::Tensor row_max(const fastssl::TileProducts& products, const at::Tensor& r, double inv_tau) {
  const int64_t n = r.size(0);
  const double lowest = -std::numeric_limits<double>::infinity();
  at::Tensor out = at::full({n, 1}, lowest, r.options());
  reduce_upper_tiles(n, out, Combine::kMax, lowest,
                     [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1, bool diagonal, const fastssl::TileOut& parts) {
                       fastssl::score_max(products.scores(i0, i1, j0, j1, 1.0), inv_tau, diagonal ? 0 : fastssl::kKeepAll,
                                          parts, r.slice(0, i0, i1), r.slice(0, j0, j1));
                     });
  return out.squeeze(1);
}

// r [N] in x's dtype, contiguous.
at::Tensor inverse_norms(const at::Tensor& r, const at::Tensor& x, const char* fn) {
  TORCH_CHECK(r.dim() == 1 && r.size(0) == x.size(0), fn, ": r must be [", x.size(0), "], got ", r.sizes());
  return r.to(x.scalar_type()).contiguous();
}

}  // namespace

at::Tensor ntxent_lse_fwd_cpu(const at::Tensor& x_in, const at::Tensor& r_in, double inv_tau) {
  const at::Tensor x = fastssl::unit_rows(x_in, "ntxent_lse_fwd_cpu", "x");
  const at::Tensor r = inverse_norms(r_in, x, "ntxent_lse_fwd_cpu");
  const int64_t n = x.size(0);
  const bool fixed = fixed_shift_is_exact(inv_tau);
  const fastssl::TileProducts products(x, x, false);
  // shift_i = m for every row (a), or the row's own max (b); S is symmetric, so column j's is row j's
  const at::Tensor shift = fixed ? at::full({n}, inv_tau, x.options()) : row_max(products, r, inv_tau);
  at::Tensor sums = at::zeros({n, 1}, x.options());
  reduce_upper_tiles(n, sums, Combine::kSum, 0.0,
                     [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1, bool diagonal, const fastssl::TileOut& parts) {
                       const at::Tensor e = products.scores(i0, i1, j0, j1, 1.0);
                       fastssl::exp_sums(e, inv_tau, fastssl::tile_shift(fixed, inv_tau, shift, shift, i0, i1, j0, j1),
                                         diagonal ? 0 : fastssl::kKeepAll, parts, r.slice(0, i0, i1), r.slice(0, j0, j1));
                     });
  return shift + sums.squeeze(1).log();
}

// dL/dx_i = r_i dL/dz_i = inv_tau sum_j B_ij x_j with B_ij = r_i r_j A_ij, symmetric like A.
at::Tensor ntxent_lse_bwd_cpu(const at::Tensor& grad_lse, const at::Tensor& x_in, const at::Tensor& r_in,
                              const at::Tensor& lse_in, double inv_tau) {
  const at::Tensor x = fastssl::unit_rows(x_in, "ntxent_lse_bwd_cpu", "x");
  const at::Tensor r = inverse_norms(r_in, x, "ntxent_lse_bwd_cpu");
  const at::Tensor g = grad_lse.to(x.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.to(x.scalar_type()).contiguous();
  const int64_t n = x.size(0);
  const bool fixed = fixed_shift_is_exact(inv_tau);
  // (a): P_ij = e_ij c_i with c_i = exp(m - lse_i) <= exp(2/tau), finite under the same bound, so
  // A_ij = e_ij (u_i + u_j) with u_i = g_i c_i; (b): P_ij = exp(s_ij - lse_i), u_i = g_i.
  const at::Tensor u = fixed ? g * (inv_tau - lse).exp() : g;
  const fastssl::TileProducts products(x, x, true);
  at::Tensor grad = products.cols_like(n);
  reduce_upper_tiles(
      n, grad, Combine::kSum, 0.0,
      [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1, bool diagonal, const fastssl::TileOut& parts) {
        // B_ij = r_i r_j (g_i P_ij + g_j P_ji), from (2), in place of the tile's products
        at::Tensor b = products.scores(i0, i1, j0, j1, 1.0);
        const fastssl::Shift shift = fastssl::tile_shift(fixed, inv_tau, lse, lse, i0, i1, j0, j1);
        const at::Tensor r_i = r.slice(0, i0, i1), r_j = r.slice(0, j0, j1);
        if (!diagonal || fixed) {  // P_ij and P_ji both from entry (i, j)
          fastssl::exp_weights(b, inv_tau, shift, u.slice(0, i0, i1), u.slice(0, j0, j1), diagonal ? 0 : fastssl::kKeepAll,
                               r_i, r_j);
        } else {
          // A diagonal tile holds s_ij and s_ji, two dot products that may differ in the last bit, and
          // the forward summed row j's terms from s_ji: so P_ji is taken from entry (j, i), B = C + C^T
          // with C_ij = r_i r_j g_i P_ij. It matters where an ulp of s is large (|s| ~ 1/tau = 1e8: 8,
          // e^8 in P_ji); under the fixed shift (|s| <= 40, an ulp <= 4e-6) the transpose is not paid.
          fastssl::exp_weights(b, inv_tau, shift, u.slice(0, i0, i1), at::zeros_like(r_j), 0, r_i, r_j);
          b = (b + b.t()).contiguous();
        }
        products.weighted(b, i0, i1, j0, j1, parts);
      });
  return grad.mul_(inv_tau).to(x_in.scalar_type()).contiguous();
}
