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
//   loss_fwd:      lse_i = LSE_k(s_ik / tau_s) and dot_{g,i} = sum_k q_{(g,b(i)),k} s_ik / tau_s  (4)
//   loss_bwd:      given dL/dlse and dL/ddot, with p_ik = exp(s_ik / tau_s - lse_i),
//                  G_ik = (dL/dlse_i p_ik + sum_g dL/ddot_{g,i} q_{(g,b(i)),k}) / tau_s,
//                  dL/dS = G W and dL/dW = G^T S, tile by tile (the tile's rows of dL/dW at once). (5)
// Every loss of fastssl/ops/dino.py is a linear combination of lse and dot, so (4) and (5) are all
// the fused part; the softmax normaliser (2) and the Sinkhorn scalings (3) are one pass each.
//
// Each tile is one GEMM (at::mm, threaded) and a few passes of elementwise ATen ops over it; the
// tile holds at most kTileElems logits, so work memory is a few such tiles: O((N + R) d + K d).
// Online log-sum-exp over the tiles: a running max and a running sum rescaled when the max grows.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "../ops.h"

namespace {

// logits per tile: 1 Mi elements, 4 MiB in fp32
constexpr int64_t kTileElems = int64_t{1} << 20;

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// rows [n, d] as a contiguous tensor in the accumulation dtype (fp32; fp64 for fp64 input)
at::Tensor acc_rows(const at::Tensor& x, const char* fn, const char* name) {
  TORCH_CHECK(x.dim() == 2, fn, ": ", name, " must be 2-D, got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  return x.to(acc_type(x)).contiguous();
}

// tile width over K for tiles of `rows` rows
int64_t tile_width(int64_t rows, int64_t k) { return std::clamp<int64_t>(kTileElems / std::max<int64_t>(rows, 1), 16, k); }

// logits of rows x [n, d] against prototypes w[k0:k1] (any dtype), times inv_tau: [n, k1 - k0]
at::Tensor tile_logits(const at::Tensor& x, const at::Tensor& w, int64_t k0, int64_t k1, double inv_tau) {
  return at::mm(x, w.slice(0, k0, k1).to(x.scalar_type()).t()).mul_(inv_tau);
}

// Online log-sum-exp of rows over tiles: lse = max + log(sum), the sum kept relative to the max.
struct OnlineLse {
  at::Tensor max, sum;
  OnlineLse(int64_t n, const at::TensorOptions& options)
      : max(at::full({n}, -std::numeric_limits<double>::infinity(), options)), sum(at::zeros({n}, options)) {}
  void add(const at::Tensor& x) {  // x [n, kt]
    at::Tensor grown = at::maximum(max, std::get<0>(x.max(1)));
    // exp(-inf - finite) = 0 on the first tile; a row that is -inf everywhere stays NaN-free only
    // while some logit is finite, which a finite input guarantees
    sum.mul_((max - grown).exp_()).add_((x - grown.unsqueeze(1)).exp_().sum(1));
    max = grown;
  }
  at::Tensor lse() const { return max + sum.log(); }
};

// q of (1) for teacher rows t [R, kt] (already t / tau_t) of the tile k0.., as [G, B, kt]
at::Tensor teacher_q(const at::Tensor& t, const at::Tensor& a, const at::Tensor& beta, int64_t k0, int64_t k1) {
  const int64_t g = a.size(0), r = t.size(0);
  return t.view({g, r / g, k1 - k0})
      .add_(a.slice(1, k0, k1).unsqueeze(1))
      .add_(beta.view({g, r / g, 1}))
      .exp_();
}

struct LossShapes {
  int64_t n, r, g, b, v, k;
};

LossShapes loss_shapes(const at::Tensor& s, const at::Tensor& w, const at::Tensor& t, const at::Tensor& wt,
                       const at::Tensor& a, const at::Tensor& beta, const char* fn) {
  LossShapes z{s.size(0), t.size(0), a.size(0), 0, 0, w.size(0)};
  TORCH_CHECK(a.dim() == 2 && z.g > 0 && z.r % z.g == 0, fn, ": a must be [G, K] with G dividing the teacher rows");
  z.b = z.r / z.g;
  TORCH_CHECK(z.n % z.b == 0, fn, ": student rows must be a multiple of B = ", z.b);
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
  OnlineLse lse(r, t_rows.options());
  const int64_t kt = tile_width(r, k);
  for (int64_t k0 = 0; k0 < k; k0 += kt) {
    const int64_t k1 = std::min(k, k0 + kt);
    lse.add(tile_logits(t_rows, teacher_weight, k0, k1, inv_tau).add_(c.slice(0, k0, k1)));  // (2)
  }
  return {lse.lse(), lse.max};
}

std::tuple<at::Tensor, at::Tensor> dino_sinkhorn_sums_cpu(const at::Tensor& teacher, const at::Tensor& teacher_weight,
                                                          double inv_tau, double shift, const at::Tensor& u,
                                                          const at::Tensor& v) {
  const at::Tensor t_rows = acc_rows(teacher, "dino_sinkhorn_sums_cpu", "teacher");
  const int64_t r = t_rows.size(0), k = teacher_weight.size(0);
  TORCH_CHECK(u.numel() == k && v.numel() == r, "dino_sinkhorn_sums_cpu: u must be [K] and v [R]");
  const at::Tensor uu = u.to(t_rows.scalar_type()).contiguous(), vv = v.to(t_rows.scalar_type()).reshape({r, 1});
  at::Tensor rows = at::empty({k}, t_rows.options()), cols = at::zeros({r}, t_rows.options());
  const int64_t kt = tile_width(r, k);
  for (int64_t k0 = 0; k0 < k; k0 += kt) {
    const int64_t k1 = std::min(k, k0 + kt);
    at::Tensor e = tile_logits(t_rows, teacher_weight, k0, k1, inv_tau).sub_(shift).exp_();  // (3)
    e.mul_(uu.slice(0, k0, k1)).mul_(vv);
    rows.slice(0, k0, k1).copy_(e.sum(0));
    cols.add_(e.sum(1));
  }
  return {rows, cols};
}

std::tuple<at::Tensor, at::Tensor> dino_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& weight,
                                                     const at::Tensor& teacher, const at::Tensor& teacher_weight,
                                                     const at::Tensor& a, const at::Tensor& beta, double inv_tau_s,
                                                     double inv_tau_t) {
  const char* fn = "dino_loss_fwd_cpu";
  const at::Tensor s_rows = acc_rows(student, fn, "student"), t_rows = acc_rows(teacher, fn, "teacher");
  const LossShapes z = loss_shapes(s_rows, weight, t_rows, teacher_weight, a, beta, fn);
  const at::Tensor aa = a.to(s_rows.scalar_type()).contiguous(), bb = beta.to(s_rows.scalar_type()).contiguous();
  OnlineLse lse(z.n, s_rows.options());
  at::Tensor dots = at::zeros({z.g, z.v, z.b}, s_rows.options());
  const int64_t kt = tile_width(std::max(z.n, z.r), z.k);
  for (int64_t k0 = 0; k0 < z.k; k0 += kt) {
    const int64_t k1 = std::min(z.k, k0 + kt);
    const at::Tensor s = tile_logits(s_rows, weight, k0, k1, inv_tau_s);
    lse.add(s);
    const at::Tensor q = teacher_q(tile_logits(t_rows, teacher_weight, k0, k1, inv_tau_t), aa, bb, k0, k1);
    const at::Tensor sv = s.view({z.v, z.b, k1 - k0});
    for (int64_t g = 0; g < z.g; ++g) dots[g].add_((sv * q[g].unsqueeze(0)).sum(2));  // (4)
  }
  return {lse.lse(), dots.view({z.g, z.n})};
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
  const at::Tensor aa = acc(a), bb = acc(beta), lse_col = acc(lse).view({z.n, 1});
  const at::Tensor g_lse = acc(grad_lse).view({z.n, 1}), g_dots = acc(grad_dots).view({z.g, z.v, z.b, 1});
  at::Tensor grad_student = at::zeros_like(s_rows);
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  const int64_t kt = tile_width(std::max(z.n, z.r), z.k);
  for (int64_t k0 = 0; k0 < z.k; k0 += kt) {
    const int64_t k1 = std::min(z.k, k0 + kt);
    // (5): G = (dL/dlse p + sum_g dL/ddot_g q_g) / tau_s, built in the tile of s
    at::Tensor grad = tile_logits(s_rows, weight, k0, k1, inv_tau_s).sub_(lse_col).exp_().mul_(g_lse);
    const at::Tensor q = teacher_q(tile_logits(t_rows, teacher_weight, k0, k1, inv_tau_t), aa, bb, k0, k1);
    const at::Tensor gv = grad.view({z.v, z.b, k1 - k0});
    for (int64_t g = 0; g < z.g; ++g) gv.add_(q[g].unsqueeze(0) * g_dots[g]);
    grad.mul_(inv_tau_s);
    grad_student.add_(at::mm(grad, weight.slice(0, k0, k1).to(grad.scalar_type())));
    grad_weight.slice(0, k0, k1).copy_(at::mm(grad.t(), s_rows));
  }
  return {grad_student.to(student.scalar_type()), grad_weight};
}
