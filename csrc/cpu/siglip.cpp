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
// log sigmoid and sigmoid are ATen's stable ones (min(u, 0) - log1p(exp(-|u|)), no overflow).
//
// Threads and memory: fastssl::reduce_tiles (csrc/tiles.h): a tile per thread and per-thread row
// partials of at most 64 MiB; never M x N.
#include <ATen/ATen.h>

#include <tuple>

#include "../ops.h"
#include "../tiles.h"

namespace {

using fastssl::Combine;
using fastssl::reduce_tiles;
using fastssl::unit_rows;

// u_ij = z_ij l_ij on tile (i0.., j0..): the negated logits, and the logits themselves on the
// positives (the tile's diagonal i0 + offset - j0; empty when the tile holds none).
at::Tensor signed_logits(const at::Tensor& x, const at::Tensor& y, double scale, double bias, int64_t offset,
                         int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  at::Tensor u = at::mm(x.slice(0, i0, i1), y.slice(0, j0, j1).t()).mul_(-scale).sub_(bias);
  u.diagonal(i0 + offset - j0).neg_();
  return u;
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

}  // namespace

at::Tensor siglip_fwd_cpu(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale,
                          const at::Tensor& bias, int64_t offset) {
  const Inputs in = inputs(x_in, y_in, scale, bias, "siglip_fwd_cpu");
  const int64_t m = in.x.size(0), n = in.y.size(0);
  at::Tensor rows = at::zeros({m, 1}, in.x.options());
  at::Tensor no_cols;
  reduce_tiles(m, n, rows, no_cols, Combine::kSum, 0.0, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    at::Tensor u = signed_logits(in.x, in.y, in.scale, in.bias, offset, i0, i1, j0, j1);
    return std::make_pair(at::log_sigmoid(u).sum(1, true).neg_(), at::Tensor());  // (1)
  });
  return rows.squeeze(1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_cpu(const at::Tensor& grad_row,
                                                                          const at::Tensor& x_in,
                                                                          const at::Tensor& y_in,
                                                                          const at::Tensor& scale,
                                                                          const at::Tensor& bias, int64_t offset) {
  const Inputs in = inputs(x_in, y_in, scale, bias, "siglip_bwd_cpu");
  const int64_t m = in.x.size(0), n = in.y.size(0), d = in.x.size(1);
  TORCH_CHECK(grad_row.numel() == m, "siglip_bwd_cpu: grad_row must have ", m, " elements");
  const at::Tensor g = grad_row.to(in.x.scalar_type()).contiguous().unsqueeze(1);
  // rows: (A Y)_i in columns 0..D-1 and sum_j A_ij in column D; cols: (A^T X)_j
  at::Tensor rows = at::zeros({m, d + 1}, in.x.options());
  at::Tensor cols = at::zeros({n, d}, in.x.options());
  reduce_tiles(m, n, rows, cols, Combine::kSum, 0.0, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    at::Tensor u = signed_logits(in.x, in.y, in.scale, in.bias, offset, i0, i1, j0, j1);
    // A_ij = -g_i z_ij sigmoid(-u_ij): +g_i sigmoid(l_ij) off the positives, -g_i sigmoid(-l_ij) on them
    at::Tensor a = at::sigmoid(u.neg_());
    a.diagonal(i0 + offset - j0).neg_();
    a.mul_(g.slice(0, i0, i1));
    at::Tensor row_part = at::cat({at::mm(a, in.y.slice(0, j0, j1)), a.sum(1, true)}, 1);
    return std::make_pair(row_part, at::mm(a.t(), in.x.slice(0, i0, i1)));
  });
  const at::Tensor ay = rows.narrow(1, 0, d);
  at::Tensor grad_scale = (in.x * ay).sum();                  // (3)
  at::Tensor grad_bias = rows.narrow(1, d, 1).sum();          // (3)
  at::Tensor dx = (ay * in.scale).to(x_in.scalar_type());     // (2)
  at::Tensor dy = cols.mul_(in.scale).to(y_in.scalar_type());  // (2)
  return {dx, dy, grad_scale, grad_bias};
}
