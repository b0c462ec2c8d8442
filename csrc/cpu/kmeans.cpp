// Greedy k-means++ on the CPU: one seeding step in one pass over the rows (docs/design.md, "kNN and
// k-means"; fastssl/neighbors.py, _seed_kmeans_plusplus, runs it K - 1 times).
//
// For rows x_i [n, D] with squared norms x_sq_i, the squared distances d2_i to the nearest seed so far
// and L candidates c_l [L, D], the step needs, for every candidate,
//   t_li = min(d2_i, max(0, ||c_l||^2 - 2 c_l.x_i + ||x_i||^2)),   the new D^2 if c_l is kept,   (1)
//   P_l  = sum_i t_li,                                              its potential, in fp64.      (2)
// With L ~ 8 dot products per row the step is bound by reading x once, so each row is done while it
// is in L1: its dot products with a group of kGroup candidates, (1) for them into out [L, n], and
// their terms of (2) added to the row block's partial sums. The blocks of kBlock rows are the unit
// of work of the threads, and their partial sums are added in block order: P does not depend on the
// number of threads.
//
// Dot products: kWidth partial sums over d per candidate (one AVX-512 register, two AVX2 ones: the
// same summation order in every clone, though the baseline clone rounds the products that the
// others fuse into FMAs), two rows at a time so that each candidate load serves both; the
// candidates' columns padded with zeros to a multiple of kWidth and their rows to a multiple of
// kGroup. Each row's kGroup x kWidth partials are then added pairwise across registers, a
// transposing tree (4 + 2 + 1 + 1 vector adds) that leaves its kGroup dot products in one vector.
// At n = 100000, D = 128, L = 7 on 2 cores (load 2): 5.7 ms per step against 8.5 ms for the GEMM
// and three passes over [L, n] it replaces (reading x once: ~3 ms).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "../ops.h"
#include "vec_math.h"

namespace {

constexpr int64_t kBlock = 256;  // rows per unit of work (and per partial sum of (2))
constexpr int64_t kGroup = 8;    // candidates whose dot products run together
constexpr int64_t kWidth = 16;   // partial sums over d per candidate

// GCC vector types: lane-wise arithmetic, lowered to whatever width each clone has.
typedef float F16 __attribute__((vector_size(kWidth * sizeof(float))));
typedef float F8 __attribute__((vector_size(kGroup * sizeof(float))));
typedef double D8 __attribute__((vector_size(kGroup * sizeof(double))));

inline F16 load(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// (a_j + a_{j+8}) for j < 8, then the same for b, in one vector
inline F16 fold8(F16 a, F16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
// each 8-lane half (j + j+4 for j < 4), a's halves then b's
inline F16 fold4(F16 a, F16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
// each 4-lane quarter (j + j+2 for j < 2)
inline F16 fold2(F16 a, F16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
// the sum of the kWidth lanes of each acc[g], as lane g
inline F8 lane_sums(const F16* acc) {
  const F16 a = fold2(fold4(fold8(acc[0], acc[1]), fold8(acc[2], acc[3])),
                      fold4(fold8(acc[4], acc[5]), fold8(acc[6], acc[7])));
  return __builtin_shufflevector(a, a, 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(a, a, 1, 3, 5, 7, 9, 11, 13, 15);
}

struct Step {
  const float *x, *x_sq, *d2, *c, *c_sq;  // c [groups * kGroup, dp], c_sq [groups * kGroup]
  float* out;
  int64_t n, d, dp, l, groups;
};

// The dot products of R rows x_r (row stride d) with the kGroup candidates c (row stride dp): R x
// kGroup accumulators, each candidate's load shared by the R rows.
template <int R>
inline void group_dots(const float* x, int64_t d, const float* c, int64_t dp, F8* dots) {
  const int64_t full = d / kWidth * kWidth;
  F16 acc[R][kGroup] = {};
  for (int64_t k = 0; k < dp; k += kWidth) {
    F16 xv[R];
    for (int r = 0; r < R; ++r) {
      if (k < full) {
        xv[r] = load(x + r * d + k);
      } else {  // the tail of the row, zero-padded as the candidates' columns
        float tail[kWidth] = {};
        std::memcpy(tail, x + r * d + k, (d - k) * sizeof(float));
        xv[r] = load(tail);
      }
    }
    for (int64_t j = 0; j < kGroup; ++j) {
      const F16 cv = load(c + j * dp + k);
      for (int r = 0; r < R; ++r) acc[r][j] += xv[r] * cv;
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = lane_sums(acc[r]);
}

// Rows r0..r1 of (1) into out and their sums (2) into sums [groups * kGroup].
FASTSSL_ROW_KERNEL void step_rows(const Step& step, int64_t r0, int64_t r1, double* sums) {
  const Step s = step;  // locals: the stores into out cannot alias them
  for (int64_t g = 0; g < s.groups; ++g) {
    const float* c = s.c + g * kGroup * s.dp;
    F8 c_sq;
    std::memcpy(&c_sq, s.c_sq + g * kGroup, sizeof c_sq);
    const int64_t live = std::min(kGroup, s.l - g * kGroup);  // candidates of this group that are not padding
    float* out = s.out + g * kGroup * s.n;
    D8 sum = {};
    // (1) for row r from its dot products, and its terms of (2)
    auto finish = [&](int64_t r, F8 dots) {
      const F8 v = (c_sq - 2.0f * dots) + s.x_sq[r];
      const F8 zero = {}, d2 = zero + s.d2[r];
      const F8 t = v > zero ? v : zero;
      const F8 u = t < d2 ? t : d2;
      sum += __builtin_convertvector(u, D8);
      for (int64_t j = 0; j < live; ++j) out[j * s.n + r] = u[j];
    };
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) {
      F8 dots[2];
      group_dots<2>(s.x + r * s.d, s.d, c, s.dp, dots);
      finish(r, dots[0]);
      finish(r + 1, dots[1]);
    }
    if (r < r1) {
      F8 dots[1];
      group_dots<1>(s.x + r * s.d, s.d, c, s.dp, dots);
      finish(r, dots[0]);
    }
    for (int64_t j = 0; j < kGroup; ++j) sums[g * kGroup + j] = sum[j];
  }
}

}  // namespace

at::Tensor kmeans_pp_step_cpu(const at::Tensor& x, const at::Tensor& x_sq, const at::Tensor& d2,
                              const at::Tensor& candidates, at::Tensor out) {
  const char* fn = "kmeans_pp_step_cpu";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &x_sq, &d2, &candidates, &out})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(), fn,
                ": tensors must be contiguous fp32 CPU tensors");
  TORCH_CHECK(x.dim() == 2 && candidates.dim() == 2 && candidates.size(1) == x.size(1), fn,
              ": x [n, D] and candidates [L, D] must have the same D");
  const int64_t n = x.size(0), d = x.size(1), l = candidates.size(0);
  TORCH_CHECK(x_sq.numel() == n && d2.numel() == n, fn, ": x_sq and d2 must have n elements");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == l && out.size(1) == n, fn, ": out must be [L, n]");
  const int64_t groups = (l + kGroup - 1) / kGroup, padded = groups * kGroup;
  const int64_t dp = (d + kWidth - 1) / kWidth * kWidth;
  at::Tensor c = at::zeros({padded, dp}, x.options());
  c.narrow(0, 0, l).narrow(1, 0, d).copy_(candidates);
  at::Tensor c_sq = at::zeros({padded}, x.options());
  c_sq.narrow(0, 0, l).copy_((candidates * candidates).sum(1));
  const Step s{x.data_ptr<float>(), x_sq.data_ptr<float>(), d2.data_ptr<float>(), c.data_ptr<float>(),
               c_sq.data_ptr<float>(), out.data_ptr<float>(), n, d, dp, l, groups};
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks * padded);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) step_rows(s, b * kBlock, std::min(n, (b + 1) * kBlock), &partial[b * padded]);
  });
  at::Tensor potentials = at::zeros({l}, x.options().dtype(at::kDouble));
  double* p = potentials.data_ptr<double>();
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t j = 0; j < l; ++j) p[j] += partial[b * padded + j];
  return potentials;
}
