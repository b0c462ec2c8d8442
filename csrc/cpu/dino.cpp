// DINO, iBOT and SwAV prototype losses on the CPU, fused with the last (prototype) layer: the
// logits s = S W^T [N, K] and t = T Wt^T [R, K] exist only as [rows, kt] tiles over K, forward and
// backward (docs/design.md, "DINO, iBOT and SwAV prototype losses").
//
// Teacher rows r = (g, b), g < G crops of B samples (R = G B); student rows i = (v, b), N = V B.
// The teacher distribution of row r is
//   q_rk = exp(t_rk / tau_t + a_gk + beta_r)                                                   (1)
// with a = -c / tau_t (DINO's center), 0, or log u_k - m (Sinkhorn), and beta_r its log-normaliser
// (-LSE_k of the rest for a softmax, log v_r for Sinkhorn). The kernels here are
//   teacher_lse:   LSE_k(t_rk / tau_t + shift_k) and max_k of the same, per teacher row         (2)
//   sinkhorn_sums: with E_rk = exp(t_rk / tau_t - m) u_k v_r: sum_r E_rk [K] and sum_k E_rk [R]   (3)
//   sinkhorn:      on one process, the Sinkhorn scalings with one pass per iteration (3')
//   loss_fwd:      lse_i = LSE_k(s_ik / tau_s) and dot_{g,i} = sum_k q_{(g,b(i)),k} s_ik / tau_s, and
//                  with no beta given, (2) for a softmax teacher in the same pass               (4)
//   loss_bwd:      given dL/dlse and dL/ddot, with p_ik = exp(s_ik / tau_s - lse_i),
//                  G_ik = (dL/dlse_i p_ik + sum_g dL/ddot_{g,i} q_{(g,b(i)),k}) / tau_s,
//                  dL/dS = G W and dL/dW = G^T S, tile by tile (the tile's rows of dL/dW at once). (5)
// Every loss of fastssl/ops/dino.py is a linear combination of lse and dot, so (4) and (5) are all
// the fused part; the Sinkhorn scalings (3) are one pass each, (3') one per iteration, and (2), a
// pass of its own for the Triton kernels' beta and the Sinkhorn max, joins (4) in C++.
//
// Each tile is one GEMM (at::mm_out into a reused buffer, threaded) and then one pass per row in an
// OpenMP loop (at::parallel_for) that does all the elementwise work of (2)-(5) while the row is in
// cache: scale, online log-sum-exp, q, the dot products, the gradient. A tile holds at most
// kTileElems logits, so work memory is two such tiles: O((N + R) d + K d).
// Online log-sum-exp over the tiles: a running max and a running sum rescaled when the max grows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "vec_math.h"

namespace {

using fastssl::exp_tile;
using fastssl::kLanes;
using fastssl::lane_sum;

// logits per tile: 1 Mi elements, 4 MiB in fp32
constexpr int64_t kTileElems = int64_t{1} << 20;

// The row loops below vectorise (setup.py's -fno-trapping-math lets GCC if-convert exp_tile's
// clamp); FASTSSL_ROW_KERNEL functions (csrc/cpu/vec_math.h) are also compiled for AVX2+FMA and
// AVX-512 and picked at load time, so that a wheel built for baseline x86-64 runs them 8 or 16 wide.
// Every clone does the same operations in the same order (no contraction under -std=c++20, the
// kLanes partial sums fixed), so the results do not depend on the CPU.

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// rows [n, d] as a contiguous tensor in the accumulation dtype (fp32; fp64 for fp64 input)
at::Tensor acc_rows(const at::Tensor& x, const char* fn, const char* name) {
  TORCH_CHECK(x.dim() == 2, fn, ": ", name, " must be 2-D, got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  return x.to(acc_type(x)).contiguous();
}

// tile width over K for tiles of `rows` rows
int64_t tile_width(int64_t rows, int64_t k) { return std::clamp<int64_t>(kTileElems / std::max<int64_t>(rows, 1), 16, k); }

// Σ_k a_k b_k over kLanes partial sums
template <class T>
FASTSSL_ROW_KERNEL T lane_dot(const T* a, const T* b, int64_t n) {
  T part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += a[k + j] * b[k + j];
  T s = 0;
  for (; k < n; ++k) s += a[k] * b[k];
  for (int j = 0; j < kLanes; ++j) s += part[j];
  return s;
}
template <class T>
T lane_max(const T* a, int64_t n) {
  T part[kLanes];
  std::fill(part, part + kLanes, -std::numeric_limits<T>::infinity());
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] = std::max(part[j], a[k + j]);
  T m = -std::numeric_limits<T>::infinity();
  for (; k < n; ++k) m = std::max(m, a[k]);
  for (int j = 0; j < kLanes; ++j) m = std::max(m, part[j]);
  return m;  // may drop a NaN: online_lse's exp(NaN − max) = NaN still makes the sum NaN
}

// The row x[0:n] becomes x·scale + add (add may be null), then joins the running (max, sum) of its
// log-sum-exp; e is scratch.
template <class T>
FASTSSL_ROW_KERNEL void online_lse(T* x, int64_t n, T scale, const T* add, T& max, T& sum, T* e) {
  if (add)
    for (int64_t k = 0; k < n; ++k) x[k] = x[k] * scale + add[k];
  else
    for (int64_t k = 0; k < n; ++k) x[k] *= scale;
  const T grown = std::max(max, lane_max(x, n));
  for (int64_t k = 0; k < n; ++k) e[k] = fastssl::exp_tile(x[k] - grown);
  // exp(-inf - finite) = 0 on the first tile
  sum = (max == -std::numeric_limits<T>::infinity() ? T(0) : sum * std::exp(max - grown)) + lane_sum(e, n);
  max = grown;
}

// x[0:n] becomes mult·exp(x·scale + add + shift) (add may be null)
template <class T>
FASTSSL_ROW_KERNEL void exp_row(T* x, int64_t n, T scale, const T* add, T shift, T mult) {
  if (add)
    for (int64_t k = 0; k < n; ++k) x[k] = mult * fastssl::exp_tile(x[k] * scale + add[k] + shift);
  else
    for (int64_t k = 0; k < n; ++k) x[k] = mult * fastssl::exp_tile(x[k] * scale + shift);
}

// x[0:n] += a·y
template <class T>
FASTSSL_ROW_KERNEL void axpy_row(T* x, const T* y, int64_t n, T a) {
  for (int64_t k = 0; k < n; ++k) x[k] += a * y[k];
}

// Column pieces of a tile for Sinkhorn, one row of the tile at a time: col_max = max(col_max, x·scale)
template <class T>
FASTSSL_ROW_KERNEL void max_into(T* col_max, const T* x, int64_t n, T scale) {
  for (int64_t k = 0; k < n; ++k) col_max[k] = std::max(col_max[k], x[k] * scale);
}

// x[0:n] becomes E = exp(x·scale + a)·v and col_sum += E
template <class T>
FASTSSL_ROW_KERNEL void exp_sum_into(T* x, T* col_sum, int64_t n, T scale, const T* a, T v) {
  for (int64_t k = 0; k < n; ++k) {
    x[k] = fastssl::exp_tile(x[k] * scale + a[k]) * v;
    col_sum[k] += x[k];
  }
}

// A reused [rows, <= kt] buffer in dtype `type`: view(kc) is the [rows, kc] tile.
struct TileBuffer {
  at::Tensor flat;
  int64_t rows;
  TileBuffer(int64_t rows_, int64_t kt, const at::TensorOptions& options)
      : flat(at::empty({rows_ * kt}, options)), rows(rows_) {}
  at::Tensor view(int64_t kc) const { return flat.narrow(0, 0, rows * kc).view({rows, kc}); }
};

// [rows, k1 - k0] = x [rows, d] · w[k0:k1]ᵀ (w of any dtype), into the buffer
at::Tensor tile_logits(const TileBuffer& buf, const at::Tensor& x, const at::Tensor& w, int64_t k0, int64_t k1) {
  at::Tensor out = buf.view(k1 - k0);
  at::mm_out(out, x, w.slice(0, k0, k1).to(x.scalar_type()).t());
  return out;
}

int64_t grain(int64_t kc) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(kc, 1)); }

struct LossShapes {
  int64_t n, r, g, b, v, k;
};

// The loss kernels' row loop of a tile: one parallel region over the samples b, each taking its
// teacher rows (g, b) and then its student rows (v, b), which read only those teacher rows: they
// are still in cache, and one region per tile waits once for the threads.
// f(b0, b1) takes the samples b0 .. b1 - 1.
template <class F>
void per_sample(const LossShapes& z, int64_t kc, const F& f) {
  at::parallel_for(0, z.b, std::max<int64_t>(1, grain(kc) / (z.g + z.v)), [&](int64_t b0, int64_t b1) {
    const fastssl::FlushDenormals flush;  // denormals: csrc/cpu/vec_math.h
    f(b0, b1);
  });
}

LossShapes loss_shapes(const at::Tensor& s, const at::Tensor& w, const at::Tensor& t, const at::Tensor& wt,
                       const at::Tensor& a, const at::Tensor& beta, const char* fn) {
  LossShapes z{s.size(0), t.size(0), a.size(0), 0, 0, w.size(0)};
  TORCH_CHECK(a.dim() == 2 && z.g > 0 && z.r % z.g == 0, fn, ": a must be [G, K] with G dividing the teacher rows");
  z.b = z.r / z.g;
  TORCH_CHECK(z.b > 0 && z.n % z.b == 0, fn, ": student rows must be a multiple of B = ", z.b);
  z.v = z.n / z.b;
  TORCH_CHECK(w.size(1) == s.size(1) && wt.size(1) == t.size(1) && wt.size(0) == z.k && a.size(1) == z.k,
              fn, ": weight [K, d] and teacher_weight [K, d] must match the features and a");
  TORCH_CHECK(beta.numel() == z.r, fn, ": beta must have one value per teacher row");
  return z;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dino_teacher_lse_cpu(const at::Tensor& teacher, const at::Tensor& teacher_weight,
                                                        const at::Tensor& shift, double inv_tau) {
  const at::Tensor t_rows = acc_rows(teacher, "dino_teacher_lse_cpu", "teacher");
  const int64_t r = t_rows.size(0), k = teacher_weight.size(0);
  TORCH_CHECK(teacher_weight.size(1) == t_rows.size(1) && shift.numel() == k,
              "dino_teacher_lse_cpu: teacher_weight must be [K, d] and shift [K]");
  const at::Tensor c = shift.to(t_rows.scalar_type()).contiguous();
  at::Tensor lse = at::empty({r}, t_rows.options()), row_max = at::empty({r}, t_rows.options());
  AT_DISPATCH_FLOATING_TYPES(t_rows.scalar_type(), "dino_teacher_lse_cpu", [&] {
    using T = scalar_t;
    std::vector<T> max(r, -std::numeric_limits<T>::infinity()), sum(r, T(0));
    const int64_t kt = tile_width(r, k);
    const TileBuffer buf(r, kt, t_rows.options());
    const T* cc = c.const_data_ptr<T>();
    for (int64_t k0 = 0; k0 < k; k0 += kt) {
      const int64_t kc = std::min(k, k0 + kt) - k0;
      T* x = tile_logits(buf, t_rows, teacher_weight, k0, k0 + kc).data_ptr<T>();
      at::parallel_for(0, r, grain(kc), [&](int64_t begin, int64_t end) {
        const fastssl::FlushDenormals flush;  // denormals: csrc/cpu/vec_math.h
        std::vector<T> e(kc);
        for (int64_t row = begin; row < end; ++row) {
          online_lse(x + row * kc, kc, T(inv_tau), cc + k0, max[row], sum[row], e.data());  // (2)
        }
      });
    }
    T* out = lse.data_ptr<T>();
    for (int64_t row = 0; row < r; ++row) out[row] = max[row] + std::log(sum[row]);
    std::copy(max.begin(), max.end(), row_max.data_ptr<T>());
  });
  return {lse, row_max};
}

std::tuple<at::Tensor, at::Tensor> dino_sinkhorn_sums_cpu(const at::Tensor& teacher, const at::Tensor& teacher_weight,
                                                          double inv_tau, double shift, const at::Tensor& u,
                                                          const at::Tensor& v) {
  const at::Tensor t_rows = acc_rows(teacher, "dino_sinkhorn_sums_cpu", "teacher");
  const int64_t r = t_rows.size(0), k = teacher_weight.size(0);
  TORCH_CHECK(u.numel() == k && v.numel() == r, "dino_sinkhorn_sums_cpu: u must be [K] and v [R]");
  const at::Tensor uu = u.to(t_rows.scalar_type()).contiguous(), vv = v.to(t_rows.scalar_type()).contiguous();
  at::Tensor rows = at::empty({k}, t_rows.options()), cols = at::zeros({r}, t_rows.options());
  AT_DISPATCH_FLOATING_TYPES(t_rows.scalar_type(), "dino_sinkhorn_sums_cpu", [&] {
    using T = scalar_t;
    const int64_t kt = tile_width(r, k);
    const TileBuffer buf(r, kt, t_rows.options());
    const T *pu = uu.const_data_ptr<T>(), *pv = vv.const_data_ptr<T>();
    T* pc = cols.data_ptr<T>();
    for (int64_t k0 = 0; k0 < k; k0 += kt) {
      const int64_t kc = std::min(k, k0 + kt) - k0;
      at::Tensor e = tile_logits(buf, t_rows, teacher_weight, k0, k0 + kc);
      T* x = e.data_ptr<T>();
      at::parallel_for(0, r, grain(kc), [&](int64_t begin, int64_t end) {
        const fastssl::FlushDenormals flush;  // denormals: csrc/cpu/vec_math.h
        for (int64_t row = begin; row < end; ++row) {
          T* xr = x + row * kc;
          for (int64_t j = 0; j < kc; ++j) xr[j] = fastssl::exp_tile(xr[j] * T(inv_tau) - T(shift)) * pu[k0 + j] * pv[row];
          pc[row] += lane_sum(xr, kc);  // (3), over prototypes
        }
      });
      at::Tensor rows_k = rows.slice(0, k0, k0 + kc);
      at::sum_out(rows_k, e, {0});  // (3), over rows
    }
  });
  return {rows, cols};
}

// Sinkhorn-Knopp on one process, one pass over the tiles per iteration. With Q_rk = exp(t_rk·inv_tau
// + a_k)·v_r, an iteration scales every prototype's total over the rows to 1/K (a_k −= log(K·Σ_r Q_rk))
// and then every row's total to 1/R (v_r /= R·Σ_k Q_rk). A tile holds every row for its prototypes,
// so it gives their totals, their new a_k and their share of every row's total at once; the row
// scaling waits for the last tile. A shift of a column cancels in its first normalisation, so the
// first iteration starts from a_k = −max_r t_rk·inv_tau (the column's max) instead of DINOv2's
// global scaling. Returns (a [K], β = log(R·v) [R]): q_rk = exp(t_rk·inv_tau + a_k + β_r).
std::tuple<at::Tensor, at::Tensor> dino_sinkhorn_cpu(const at::Tensor& teacher, const at::Tensor& teacher_weight,
                                                     double inv_tau, int64_t iterations) {
  const at::Tensor t_rows = acc_rows(teacher, "dino_sinkhorn_cpu", "teacher");
  const int64_t r = t_rows.size(0), k = teacher_weight.size(0);
  TORCH_CHECK(teacher_weight.size(1) == t_rows.size(1), "dino_sinkhorn_cpu: teacher_weight must be [K, d]");
  TORCH_CHECK(iterations >= 1, "dino_sinkhorn_cpu: at least one iteration");
  at::Tensor a = at::empty({k}, t_rows.options()), beta = at::empty({r}, t_rows.options());
  AT_DISPATCH_FLOATING_TYPES(t_rows.scalar_type(), "dino_sinkhorn_cpu", [&] {
    using T = scalar_t;
    const int64_t kt = tile_width(r, k);
    const TileBuffer buf(r, kt, t_rows.options());
    std::vector<T> v(r, T(1)), cols(r), col_sum(kt), scale(kt);
    T* pa = a.data_ptr<T>();
    for (int64_t it = 0; it < iterations; ++it) {
      std::fill(cols.begin(), cols.end(), T(0));
      for (int64_t k0 = 0; k0 < k; k0 += kt) {
        const int64_t kc = std::min(k, k0 + kt) - k0;
        T* x = tile_logits(buf, t_rows, teacher_weight, k0, k0 + kc).data_ptr<T>();
        T* ak = pa + k0;
        // columns split over the threads, every row for each
        at::parallel_for(0, kc, 64, [&](int64_t c0, int64_t c1) {
          const fastssl::FlushDenormals flush;  // denormals: csrc/cpu/vec_math.h
          if (it == 0) {
            std::fill(ak + c0, ak + c1, -std::numeric_limits<T>::infinity());
            for (int64_t row = 0; row < r; ++row) max_into(ak + c0, x + row * kc + c0, c1 - c0, T(inv_tau));
            for (int64_t j = c0; j < c1; ++j) ak[j] = -ak[j];
          }
          std::fill(col_sum.begin() + c0, col_sum.begin() + c1, T(0));
          for (int64_t row = 0; row < r; ++row)
            exp_sum_into(x + row * kc + c0, col_sum.data() + c0, c1 - c0, T(inv_tau), ak + c0, v[row]);
          for (int64_t j = c0; j < c1; ++j) {
            scale[j] = T(1) / (col_sum[j] * T(k));  // the prototype's total to 1/K
            ak[j] += std::log(scale[j]);
          }
        });
        at::parallel_for(0, r, grain(kc), [&](int64_t begin, int64_t end) {
          const fastssl::FlushDenormals flush;  // denormals: csrc/cpu/vec_math.h
          for (int64_t row = begin; row < end; ++row) cols[row] += lane_dot(x + row * kc, scale.data(), kc);
        });
      }
      for (int64_t row = 0; row < r; ++row) v[row] /= cols[row] * T(r);  // the row's total to 1/R
    }
    T* pb = beta.data_ptr<T>();
    for (int64_t row = 0; row < r; ++row) pb[row] = std::log(v[row] * T(r));
  });
  return {a, beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dino_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& weight,
                                                                 const at::Tensor& teacher,
                                                                 const at::Tensor& teacher_weight, const at::Tensor& a,
                                                                 const at::Tensor& beta, double inv_tau_s,
                                                                 double inv_tau_t) {
  const char* fn = "dino_loss_fwd_cpu";
  const at::Tensor s_rows = acc_rows(student, fn, "student"), t_rows = acc_rows(teacher, fn, "teacher");
  // beta empty: q is the softmax over k of t/τ_t + a, its normaliser found in this pass (online, as
  // the student's) and returned as beta = −LSE; otherwise beta is returned as given
  const bool normalise = beta.numel() == 0;
  const LossShapes z =
      loss_shapes(s_rows, weight, t_rows, teacher_weight, a, normalise ? at::empty({t_rows.size(0)}) : beta, fn);
  const at::Tensor aa = a.to(s_rows.scalar_type()).contiguous(), bb = beta.to(s_rows.scalar_type()).contiguous();
  at::Tensor lse = at::empty({z.n}, s_rows.options()), dots = at::zeros({z.g, z.n}, s_rows.options());
  at::Tensor beta_out = normalise ? at::empty({z.r}, s_rows.options()) : bb.clone();
  AT_DISPATCH_FLOATING_TYPES(s_rows.scalar_type(), "dino_loss_fwd_cpu", [&] {
    using T = scalar_t;
    constexpr T inf = std::numeric_limits<T>::infinity();
    std::vector<T> max(z.n, -inf), sum(z.n, T(0));
    // normalise: the teacher's running (max, sum) of its log-sum-exp, and the factor exp(old max −
    // new max) that brings the tile's dot products with exp(t/τ_t + a − max) to the new max
    std::vector<T> t_max(z.r, -inf), t_sum(z.r, T(0)), t_rescale(z.r, T(1));
    const int64_t kt = tile_width(std::max(z.n, z.r), z.k);
    const TileBuffer s_buf(z.n, kt, s_rows.options()), t_buf(z.r, kt, s_rows.options());
    T* pd = dots.data_ptr<T>();
    const T *pa = aa.const_data_ptr<T>(), *pb = bb.const_data_ptr<T>();  // pb: unused when normalising
    for (int64_t k0 = 0; k0 < z.k; k0 += kt) {
      const int64_t kc = std::min(z.k, k0 + kt) - k0;
      T* s = tile_logits(s_buf, s_rows, weight, k0, k0 + kc).data_ptr<T>();
      T* q = tile_logits(t_buf, t_rows, teacher_weight, k0, k0 + kc).data_ptr<T>();
      per_sample(z, kc, [&](int64_t b0, int64_t b1) {
        std::vector<T> e(kc);
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t g = 0; g < z.g; ++g) {
            const int64_t row = g * z.b + b;
            T* qr = q + row * kc;
            if (normalise) {  // the tile's row becomes exp(t/τ_t + a − running max), in place
              const T old = t_max[row];
              online_lse(qr, kc, T(inv_tau_t), pa + g * z.k + k0, t_max[row], t_sum[row], qr);
              t_rescale[row] = std::exp(old - t_max[row]);  // 0 on the first tile (the dots are 0 then)
            } else {
              exp_row(qr, kc, T(inv_tau_t), pa + g * z.k + k0, pb[row], T(1));  // q of (1)
            }
          }
          for (int64_t v = 0; v < z.v; ++v) {
            const int64_t i = v * z.b + b;
            T* x = s + i * kc;
            online_lse(x, kc, T(inv_tau_s), static_cast<const T*>(nullptr), max[i], sum[i], e.data());
            for (int64_t g = 0; g < z.g; ++g) {  // (4)
              const int64_t row = g * z.b + b;
              T& dot = pd[g * z.n + i];
              dot = (normalise ? dot * t_rescale[row] : dot) + lane_dot(x, q + row * kc, kc);
            }
          }
        }
      });
    }
    T* out = lse.data_ptr<T>();
    for (int64_t i = 0; i < z.n; ++i) out[i] = max[i] + std::log(sum[i]);
    if (normalise) {  // q = exp(t/τ_t + a − max) / sum: beta = −(max + log sum)
      T* pb = beta_out.data_ptr<T>();
      for (int64_t row = 0; row < z.r; ++row) pb[row] = -(t_max[row] + std::log(t_sum[row]));
      for (int64_t g = 0; g < z.g; ++g)
        for (int64_t i = 0; i < z.n; ++i) pd[g * z.n + i] /= t_sum[g * z.b + i % z.b];
    }
  });
  return {lse, dots, beta_out};
}

std::tuple<at::Tensor, at::Tensor> dino_loss_bwd_cpu(const at::Tensor& grad_lse, const at::Tensor& grad_dots,
                                                     const at::Tensor& student, const at::Tensor& weight,
                                                     const at::Tensor& teacher, const at::Tensor& teacher_weight,
                                                     const at::Tensor& a, const at::Tensor& beta,
                                                     const at::Tensor& lse, double inv_tau_s, double inv_tau_t) {
  const char* fn = "dino_loss_bwd_cpu";
  const at::Tensor s_rows = acc_rows(student, fn, "student"), t_rows = acc_rows(teacher, fn, "teacher");
  const LossShapes z = loss_shapes(s_rows, weight, t_rows, teacher_weight, a, beta, fn);
  TORCH_CHECK(grad_lse.numel() == z.n && lse.numel() == z.n && grad_dots.numel() == z.g * z.n,
              fn, ": grad_lse and lse must be [N], grad_dots [G, N]");
  const auto acc = [&](const at::Tensor& x) { return x.to(s_rows.scalar_type()).contiguous(); };
  const at::Tensor aa = acc(a), bb = acc(beta), lse_acc = acc(lse), g_lse = acc(grad_lse), g_dots = acc(grad_dots);
  at::Tensor grad_student = at::zeros_like(s_rows);
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  const bool weight_is_acc = weight.scalar_type() == s_rows.scalar_type() && grad_weight.is_contiguous();
  AT_DISPATCH_FLOATING_TYPES(s_rows.scalar_type(), "dino_loss_bwd_cpu", [&] {
    using T = scalar_t;
    const int64_t kt = tile_width(std::max(z.n, z.r), z.k);
    const TileBuffer s_buf(z.n, kt, s_rows.options()), t_buf(z.r, kt, s_rows.options());
    const T *pl = lse_acc.const_data_ptr<T>(), *pgl = g_lse.const_data_ptr<T>(), *pgd = g_dots.const_data_ptr<T>();
    const T *pa = aa.const_data_ptr<T>(), *pb = bb.const_data_ptr<T>();
    for (int64_t k0 = 0; k0 < z.k; k0 += kt) {
      const int64_t k1 = std::min(z.k, k0 + kt), kc = k1 - k0;
      at::Tensor grad = tile_logits(s_buf, s_rows, weight, k0, k1);
      T* s = grad.data_ptr<T>();
      T* q = tile_logits(t_buf, t_rows, teacher_weight, k0, k1).data_ptr<T>();
      // q of (1), then (5): G = (dL/dlse p + sum_g dL/ddot_g q_g) / tau_s, in place of the tile of s
      per_sample(z, kc, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t g = 0; g < z.g; ++g) {
            const int64_t row = g * z.b + b;
            exp_row(q + row * kc, kc, T(inv_tau_t), pa + g * z.k + k0, pb[row], T(1));
          }
          for (int64_t v = 0; v < z.v; ++v) {
            const int64_t i = v * z.b + b;
            T* x = s + i * kc;
            exp_row(x, kc, T(inv_tau_s), static_cast<const T*>(nullptr), -pl[i], pgl[i] * T(inv_tau_s));
            for (int64_t g = 0; g < z.g; ++g)
              axpy_row(x, q + (g * z.b + b) * kc, kc, pgd[g * z.n + i] * T(inv_tau_s));
          }
        }
      });
      grad_student.addmm_(grad, weight.slice(0, k0, k1).to(grad.scalar_type()));
      if (weight_is_acc) {
        at::Tensor out = grad_weight.slice(0, k0, k1);
        at::mm_out(out, grad.t(), s_rows);
      } else {
        grad_weight.slice(0, k0, k1).copy_(at::mm(grad.t(), s_rows));
      }
    }
  });
  return {grad_student.to(student.scalar_type()), grad_weight};
}
