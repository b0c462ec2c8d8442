// Declarations of the C++ kernels bound in ops.cpp. Each takes and returns plain tensors and
// knows nothing about autograd: fastssl/ops/<op>.py registers the torch.library op around it.
#pragma once
#include <ATen/ATen.h>

// ntxent: lse_i = log sum_{j != i} exp(inv_tau * z_i . z_j) over unit rows z [N, D].
at::Tensor ntxent_lse_fwd_cpu(const at::Tensor& z, double inv_tau);
at::Tensor ntxent_lse_bwd_cpu(const at::Tensor& grad_lse, const at::Tensor& z,
                              const at::Tensor& lse, double inv_tau);

// mochi: synthetic-negative logits inv_tau q_b.norm(w a^ + (1 - w) n^) [B, S] and the backward's
// coefficients [B, S, 2]; a = queue[first] (q_bar[b] where first = -1), n = queue[second], x^ = x/|x|.
std::tuple<at::Tensor, at::Tensor> mochi_mix_fwd_cpu(const at::Tensor& q, const at::Tensor& q_bar,
                                                     const at::Tensor& queue, const at::Tensor& first,
                                                     const at::Tensor& second, const at::Tensor& weight,
                                                     double inv_tau);
at::Tensor mochi_mix_bwd_cpu(const at::Tensor& grad, const at::Tensor& q_bar, const at::Tensor& queue,
                             const at::Tensor& first, const at::Tensor& second, const at::Tensor& coef,
                             double inv_tau);
// mochi: the columns of the n largest scores of every row of scores [B, K], [B, n] int64, unordered.
at::Tensor mochi_hard_set_cpu(const at::Tensor& scores, int64_t n);
