// Helpers shared by the tiled CPU kernels (csrc/cpu/*.cpp) that reduce over all pairs of unit rows.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include "cpu/vec_math.h"

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

// Where one tile's parts go: rows i0..i1 of the calling thread's row partials and, when defined (not
// on NT-Xent's diagonal tiles, nor without column results), rows j0..j1 of the column result, which
// this thread alone writes. Tile functions accumulate into them in place (exp_sums, TileProducts::
// weighted), or add a part they made with combine.
struct TileOut {
  at::Tensor rows, cols;
  Combine op;
  void combine(const at::Tensor& row_part, const at::Tensor& col_part) const {
    combine_into(rows, row_part, op);
    if (cols.defined()) combine_into(cols, col_part, op);
  }
};

// out = beta * out + alpha * a . b: the tile GEMMs of the C++ kernels go through here (and gemm
// below, and TileProducts' fallback), so that the products are one call whose backend Bf16Dots can
// switch. out contiguous; a and b may be transposed views.
inline void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  if (beta == 0.0) {
    at::mm_out(out, a, b);
    if (alpha != 1.0) out.mul_(alpha);
  } else {
    out.copy_(at::addmm(out, a, b, beta, alpha));
  }
}

// While alive, and when on, fp32 matmuls run on oneDNN with bf16 dot products and fp32
// accumulation (ATen's mkldnn fp32 precision "bf16"), where the CPU has them (AVX512-BF16 or AMX;
// elsewhere ATen ignores the mode and the fp32 path runs). TileProducts' micro-kernels replace it
// where they run (AMX); it remains for the InfoNCE forward on CPUs with AVX512-BF16 alone. For a kernel whose rows came from bf16
// inputs, rounding the rows to bf16 is exact, so S = Q K^T is the fp32 path's up to summation order
// (docs/design.md, "Tile kernels": bf16 dot products on the CPU). The mode is process-wide: it is
// restored on return or on an exception, and FASTSSL_CPU_BF16_DOTS=0 keeps the fp32 path.
class Bf16Dots {
 public:
  explicit Bf16Dots(bool on) : on_(on && enabled()) {
    if (!on_) return;
    previous_ = at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
    at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL,
                                            at::Float32Precision::BF16);
  }
  ~Bf16Dots() {
    if (on_) at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, previous_);
  }
  Bf16Dots(const Bf16Dots&) = delete;
  Bf16Dots& operator=(const Bf16Dots&) = delete;

  static bool enabled() {
    static const bool on = [] {
      const char* env = std::getenv("FASTSSL_CPU_BF16_DOTS");
      return at::hasMKLDNN() && !(env != nullptr && std::string(env) == "0");
    }();
    return on;
  }

 private:
  bool on_;
  at::Float32Precision previous_ = at::Float32Precision::NONE;
};

// alpha * a . b as a new contiguous tensor.
inline at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, double alpha = 1.0) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_into(out, a, b, 0.0, alpha);
  return out;
}

// Whether every value of x (fp32) is a bf16 number (its low 16 bits are zero): then rounding it to
// bf16 is exact and its products may take bf16 dot products with nothing lost.
bool bf16_exact(const at::Tensor& x);

// The products of the tile kernels over rows X [M, D] and Y [N, D] (contiguous fp32 or fp64):
//   scores(I, J)       = alpha X_I Y_J^T                  [R, C]
//   weighted(A, I, J)  adds A Y_J [R, D] to out.rows and, when out.cols is defined, A^T X_I [C, D]
//                      to out.cols (rows of a cols_like tensor), for a tile A [R, C] of fp32 weights.
// Where the CPU has oneDNN's bf16 micro-kernels (brgemm on AMX) and the rows are bf16 numbers
// (bf16_exact: bf16 inputs, widened), they run there, with fp32 accumulation: S is then the fp32
// product up to summation order, and A = A_hi + A_lo is split into two bf16 numbers (A_lo the
// rounding error of A_hi) so that A Y carries a relative error of 2^-17 per weight, not bf16's 2^-9
// (docs/design.md, "bf16 dot products on the CPU"). The rows are packed once per call into the
// layouts brgemm reads (VNNI pairs, 64-column panels, D padded to 64, rows to kTile). Elsewhere
// (fp64, fp32 rows that are not bf16 numbers, CPUs without AMX, FASTSSL_CPU_BF16_DOTS=0) ATen's
// mm. Tiles start at multiples of kTile (reduce_tiles and NT-Xent's upper tiles do).
class TileProducts {
 public:
  TileProducts(const at::Tensor& x, const at::Tensor& y, bool weighted);
  at::Tensor scores(int64_t i0, int64_t i1, int64_t j0, int64_t j1, double alpha) const;
  void weighted(const at::Tensor& a, int64_t i0, int64_t i1, int64_t j0, int64_t j1, const TileOut& out) const;
  bool bf16() const { return bf16_; }
  // Zeros [n, D] laid out as weighted's column parts come (transposed on the micro-kernels), so
  // that adding those parts runs along contiguous memory; weighted's out.cols are rows of it.
  at::Tensor cols_like(int64_t n) const;
  // Whether this CPU has the bf16 micro-kernels (and FASTSSL_CPU_BF16_DOTS is not 0).
  static bool available();

  struct Packed {
    at::Tensor rows;    // [N', D'] bf16, zero-padded: left operand of scores
    at::Tensor right;   // Y^T in VNNI panels of 64 rows [N'/64, D', 64]: right operand of scores
    at::Tensor sums;    // Y in VNNI blocks of kTile rows x 64 columns: right operand of A Y_J
    at::Tensor rows_t;  // X^T per block of kTile rows [N'/kTile, D', kTile]: left operand of X_I^T A
  };

 private:
  at::Tensor x_, y_;
  bool bf16_;
  Packed px_, py_;
};

// Frees the AMX state that TileProducts' micro-kernels leave configured on the calling thread: the
// parallel loops over tiles call it at the end of each thread's share.
void release_tile_products();

// The pair (r, r + drop) of a tile is left out (set to 0); kKeepAll leaves none out.
constexpr int64_t kKeepAll = std::numeric_limits<int64_t>::min();

// The shift of the exponent x_rc of pair (r, c): one number for every pair (fixed: m = 1/tau over unit
// rows, exact while 2/tau <= 80), or, when rows is defined, rows[r] for row r's sums and weights and
// cols[c] for column c's (each row's and column's own max x in the forward, its lse in the
// backward). rows [R] and cols [C] are the tile's slices.
struct Shift {
  double fixed = 0.0;
  at::Tensor rows, cols;
};

// The shift of tile (i0..i1, j0..j1): m for every pair when fixed, else rows[i0:i1] and cols[j0:j1]
// (cols undefined: no column sums).
inline Shift tile_shift(bool fixed, double m, const at::Tensor& rows, const at::Tensor& cols, int64_t i0, int64_t i1,
                        int64_t j0, int64_t j1) {
  if (fixed) return Shift{m};
  return Shift{0.0, rows.slice(0, i0, i1), cols.defined() ? cols.slice(0, j0, j1) : at::Tensor()};
}

// Raises out.rows [R, 1] to the row maxima of x_rc = scale w_r w'_c s_rc over a contiguous [R, C]
// fp32/fp64 tile s and, when out.cols is defined, out.cols [C, 1] to the column maxima, the left-out
// pair not counted (out.op is kMax): the per-row shifts of the kernels where the fixed one may
// underflow, in one pass. w, w' as in exp_sums.
void score_max(const at::Tensor& s, double scale, int64_t drop, const TileOut& out, const at::Tensor& w = {},
               const at::Tensor& w_cols = {});

// Adds the row sums of e_rc = exp(x_rc - shift) over a contiguous [R, C] fp32/fp64 tile s (left as it
// is), x_rc = scale w_r w'_c s_rc, to out.rows [R, 1] and, when out.cols is defined, the column sums
// to out.cols [C, 1] (both contiguous), the left-out pair counted as 0: the forward of the tile
// kernels in one pass that vectorises (csrc/tiles.cpp; docs/design.md, "Tile kernels"); with a
// per-row shift the column sums take shift.cols (two exponentials per pair). w [R] and w' [C] are the
// rows' inverse norms where the tile holds products of rows that are not unit (NT-Xent's bf16
// numbers); undefined means 1.
void exp_sums(const at::Tensor& s, double scale, const Shift& shift, int64_t drop, const TileOut& out,
              const at::Tensor& w = {}, const at::Tensor& w_cols = {});

// a_rc = exp(x_rc - shift) (u_r + v_c) w_r w'_c in place (u_r alone when v is undefined), or with a
// per-row shift (u_r exp(x_rc - shift.rows_r) + v_c exp(x_rc - shift.cols_c)) w_r w'_c, the left-out
// pair set to 0: the backward's weights A in one pass, times the inverse norms that turn A Z into A' X
// for the rows X = Z / w. u, w [R]; v, w' [C]; w, w' as in exp_sums.
void exp_weights(at::Tensor& s, double scale, const Shift& shift, const at::Tensor& u, const at::Tensor& v,
                 int64_t drop, const at::Tensor& w = {}, const at::Tensor& w_cols = {});

// Edge of the square tiles reduce_tiles visits.
constexpr int64_t kTile = 256;
// Bound on the per-thread row partials of reduce_tiles.
constexpr int64_t kPartialBytes = int64_t{64} << 20;

// Visits every tile (I, J) of the M x N matrix: tile(i0, i1, j0, j1, out) accumulates its parts into
// out (TileOut), rows of rows (M x R) and, when defined, of cols (N x C).
//
// Threads take column tiles J from a shared counter (a thread that gets less CPU takes fewer) and
// run each down all the rows of a row block: the columns of J are written by that thread alone,
// the rows go to per-thread partials reduced at the end of the block. Rows are the short side
// (queries, against keys + queue or every rank's keys), and blocks are as tall as the partials
// allow within kPartialBytes: usually one block, so one parallel region per pass.
template <class TileFn>
void reduce_tiles(int64_t m, int64_t n, at::Tensor& rows, at::Tensor& cols, Combine op, double identity,
                  TileFn tile) {
  const int64_t num_threads = at::get_num_threads();
  const int64_t col_tiles = (n + kTile - 1) / kTile;
  const int64_t tile_bytes = num_threads * kTile * rows.size(1) * rows.element_size();
  const int64_t block = std::max<int64_t>(1, kPartialBytes / tile_bytes) * kTile;
  for (int64_t r0 = 0; r0 < m; r0 += block) {
    const int64_t r1 = std::min(m, r0 + block);
    at::Tensor partial = at::full({num_threads, r1 - r0, rows.size(1)}, identity, rows.options());
    std::atomic<int64_t> next{0};
    const at::ThreadLocalState caller;  // dispatch state (below autograd, grad mode) for the workers
    at::parallel_for(0, num_threads, 1, [&](int64_t slot, int64_t) {
      at::ThreadLocalStateGuard guard(caller);
      const fastssl::FlushDenormals flush;  // denormals: csrc/cpu/vec_math.h
      at::Tensor mine = partial[slot];
      for (int64_t J = next++; J < col_tiles; J = next++) {
        const int64_t j0 = J * kTile, j1 = std::min(n, j0 + kTile);
        for (int64_t i0 = r0; i0 < r1; i0 += kTile) {
          const int64_t i1 = std::min(r1, i0 + kTile);
          tile(i0, i1, j0, j1,
               TileOut{mine.narrow(0, i0 - r0, i1 - i0), cols.defined() ? cols.narrow(0, j0, j1 - j0) : at::Tensor(), op});
        }
      }
      release_tile_products();
    });
    at::Tensor out = rows.narrow(0, r0, r1 - r0);
    combine_into(out, op == Combine::kSum ? partial.sum(0) : std::get<0>(partial.max(0)), op);
  }
}

// Rows [rows, D] as a contiguous fp32 tensor (fp64 for fp64 input: gradcheck).
inline at::Tensor unit_rows(const at::Tensor& x, const char* fn, const char* name) {
  TORCH_CHECK(x.dim() == 2, fn, ": ", name, " must be 2-D, got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  return x.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

}  // namespace fastssl
