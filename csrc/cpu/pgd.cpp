// PGD on the CPU: one fused projected-gradient step, in place.
//
// x, x0 (the clean input) and g (the loss gradient) are viewed as [B, n]: one row per sample,
// with its own radius eps_b and step alpha_b (Madry et al. 2018, "Towards Deep Learning Models
// Resistant to Adversarial Attacks"; the same arithmetic, in the same order, as torchattacks'
// PGD and PGDL2):
//
//   L-inf:  x <- clamp(x0 + clamp(x + alpha sign(g) - x0, -eps, eps), lo, hi)                (1)
//   L2:     x' = x + c g with c = alpha / (||g|| + 1e-10),  delta = x' - x0,                  (2)
//           x <- clamp(x0 + f delta, lo, hi) with f = min(1, eps / ||delta||).
//
// (1) is elementwise: one pass that reads x, x0, g and writes x. (2) needs ||g|| and ||delta||
// before any element can be written. With d = x - x0, delta = d + c g, so
//
//   ||delta||^2 = ||d||^2 + 2 c d.g + c^2 ||g||^2                                              (3)
//
// follows from three sums of a single pass; a step is then two passes, and since a thread takes
// whole samples, the second finds the sample still in its cache. The sums (products included) are
// accumulated in double, so the cancellation in (3) when delta is much shorter than d and c g costs
// nothing measurable (and f = 1 there unless eps is far below alpha), and no fp32/bf16/fp16
// gradient overflows ||g||^2 (fp64 gradients beyond ~1e154 still do).
//
// NaN is never turned into a number: sign(NaN) = NaN here (torch.sign gives 0), and clamp
// propagates NaN as torch.clamp does. A NaN gradient element gives a NaN element (L-inf) or a
// NaN sample (L2, through ||g||).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "../ops.h"

namespace {

// Elements per work item of the elementwise L-inf step (a few hundred KB of the three tensors).
constexpr int64_t kChunk = 16384;
// Independent accumulators per sum, so that the compiler vectorises the reduction loop.
constexpr int64_t kLanes = 16;

struct Sums {
  double dd = 0, dg = 0, gg = 0;  // ||d||^2, d.g, ||g||^2 of (3)
};

// clamp with torch.clamp's NaN rule: std::max(v, lo) and std::min(v, hi) return v when v is NaN.
template <class A>
inline A clamp(A v, A lo, A hi) {
  return std::min(std::max(v, lo), hi);
}

// sign(g), except that NaN stays NaN. Written as compares and one select so that the loop
// vectorises (nested branches would not, and mispredict on random signs).
template <class A>
inline A sign(A g) {
  const A s = A(g > A(0)) - A(g < A(0));
  return g != g ? g : s;
}

template <class T>
Sums sample_sums(const T* x, const T* x0, const T* g, int64_t n) {
  using A = at::opmath_type<T>;
  Sums s;
  // The products and their lanes are double: in fp32, g^2 overflows for |g| > 1.8e19 (a gradient
  // of 1e30 would give ||g|| = inf and a zero step); in double every fp32 value squares exactly.
  constexpr int64_t kBlock = 1024;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    double dd[kLanes] = {}, dg[kLanes] = {}, gg[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const double d = double(A(x[i + k]) - A(x0[i + k])), gk = double(g[i + k]);
        dd[k] += d * d;
        dg[k] += d * gk;
        gg[k] += gk * gk;
      }
    }
    for (int64_t k = 0; i < end; ++i, ++k) {
      const double d = double(A(x[i]) - A(x0[i])), gk = double(g[i]);
      dd[k] += d * d;
      dg[k] += d * gk;
      gg[k] += gk * gk;
    }
    for (int64_t k = 0; k < kLanes; ++k) {
      s.dd += dd[k];
      s.dg += dg[k];
      s.gg += gg[k];
    }
  }
  return s;
}

// (1) on elements [0, n) of one sample.
template <class T>
void linf_step(T* x, const T* x0, const T* g, int64_t n, at::opmath_type<T> eps,
               at::opmath_type<T> alpha, at::opmath_type<T> lo, at::opmath_type<T> hi) {
  using A = at::opmath_type<T>;
  for (int64_t i = 0; i < n; ++i) {
    const A x0i = A(x0[i]);
    const A delta = clamp(A(x[i]) + alpha * sign(A(g[i])) - x0i, -eps, eps);
    x[i] = T(clamp(x0i + delta, lo, hi));
  }
}

// (2) on one whole sample, with its sums (3) taken first.
template <class T>
void l2_step(T* x, const T* x0, const T* g, int64_t n, at::opmath_type<T> eps,
             at::opmath_type<T> alpha, at::opmath_type<T> lo, at::opmath_type<T> hi) {
  using A = at::opmath_type<T>;
  const Sums s = sample_sums(x, x0, g, n);
  const A c = alpha / (A(std::sqrt(s.gg)) + A(1e-10));
  const A norm = A(std::sqrt(std::max(0.0, s.dd + 2.0 * double(c) * s.dg + double(c) * double(c) * s.gg)));
  // f = min(1, eps/||delta||), written so that eps = ||delta|| = 0 gives 1, not 0/0
  const A f = norm > eps ? eps / norm : A(1);
  for (int64_t i = 0; i < n; ++i) {
    const A x0i = A(x0[i]);
    const A delta = (A(x[i]) + c * A(g[i]) - x0i) * f;
    x[i] = T(clamp(x0i + delta, lo, hi));
  }
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& x_adv) {
  TORCH_CHECK(t.device().is_cpu(), "pgd_step_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == x_adv.sizes(), "pgd_step_cpu: ", name, " has shape ", t.sizes(),
              " but x_adv has ", x_adv.sizes());
  TORCH_CHECK(t.scalar_type() == x_adv.scalar_type(), "pgd_step_cpu: ", name, " has dtype ",
              t.scalar_type(), " but x_adv has ", x_adv.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "pgd_step_cpu: ", name, " must be contiguous");
}

}  // namespace

void pgd_step_cpu(at::Tensor x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                  const at::Tensor& eps, const at::Tensor& alpha, bool l2, double lo, double hi) {
  TORCH_CHECK(x_adv.dim() >= 1, "pgd_step_cpu: x_adv must be [B, ...], got a scalar");
  check_like(x_adv, "x_adv", x_adv);
  check_like(grad, "grad", x_adv);
  check_like(x_orig, "x_orig", x_adv);
  const int64_t batch = x_adv.size(0);
  if (batch == 0 || x_adv.numel() == 0) return;
  const int64_t n = x_adv.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    TORCH_CHECK(eps.sizes() == at::IntArrayRef{batch} && alpha.sizes() == at::IntArrayRef{batch},
                "pgd_step_cpu: eps and alpha must be [B] = [", batch, "], got ", eps.sizes(), " and ",
                alpha.sizes());
    const at::Tensor eps_a = eps.to(at::kCPU, acc).contiguous();
    const at::Tensor alpha_a = alpha.to(at::kCPU, acc).contiguous();
    const A* e = eps_a.data_ptr<A>();
    const A* a = alpha_a.data_ptr<A>();
    scalar_t* x = x_adv.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* x0 = x_orig.data_ptr<scalar_t>();
    const A lo_a = A(lo), hi_a = A(hi);
    if (l2) {
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t o = b * n;
          l2_step(x + o, x0 + o, g + o, n, e[b], a[b], lo_a, hi_a);
        }
      });
    } else {
      const int64_t chunks = (n + kChunk - 1) / kChunk;  // per sample
      at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / chunks, i0 = (item % chunks) * kChunk;
          const int64_t o = b * n + i0;
          linf_step(x + o, x0 + o, g + o, std::min(kChunk, n - i0), e[b], a[b], lo_a, hi_a);
        }
      });
    }
  });
}
