// Helpers shared by the tiled CPU kernels (csrc/cpu/*.cpp) that reduce over all pairs of unit rows.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <tuple>

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

// Edge of the square tiles reduce_tiles visits.
constexpr int64_t kTile = 256;
// Bound on the per-thread row partials of reduce_tiles.
constexpr int64_t kPartialBytes = int64_t{64} << 20;

// Visits every tile (I, J) of the M x N matrix and accumulates
// tile(i0, i1, j0, j1) -> {part for rows i0..i1, part for columns j0..j1} into rows (M x R) and,
// when defined, cols (N x C).
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
      at::Tensor mine = partial[slot];
      for (int64_t J = next++; J < col_tiles; J = next++) {
        const int64_t j0 = J * kTile, j1 = std::min(n, j0 + kTile);
        for (int64_t i0 = r0; i0 < r1; i0 += kTile) {
          const int64_t i1 = std::min(r1, i0 + kTile);
          auto parts = tile(i0, i1, j0, j1);
          combine_into(mine.narrow(0, i0 - r0, i1 - i0), parts.first, op);
          if (cols.defined()) combine_into(cols.narrow(0, j0, j1 - j0), parts.second, op);
        }
      }
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
