// Declarations of the C++ kernels bound in ops.cpp. Each takes and returns plain tensors and
// knows nothing about autograd: fastssl/ops/<op>.py registers the torch.library op around it.
#pragma once
#include <ATen/ATen.h>

// ntxent: lse_i = log sum_{j != i} exp(inv_tau * z_i . z_j) over unit rows z [N, D].
at::Tensor ntxent_lse_fwd_cpu(const at::Tensor& z, double inv_tau);
at::Tensor ntxent_lse_bwd_cpu(const at::Tensor& grad_lse, const at::Tensor& z,
                              const at::Tensor& lse, double inv_tau);

// pgd: one projected-gradient step on x_adv [B, ...] in place (L-inf, or L2 when l2), with
// per-sample eps [B] and alpha [B], clamped to [lo, hi]; grad and x_orig are like x_adv.
void pgd_step_cpu(at::Tensor x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                  const at::Tensor& eps, const at::Tensor& alpha, bool l2, double lo, double hi);
#ifdef WITH_CUDA
void pgd_step_cuda(at::Tensor x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                   const at::Tensor& eps, const at::Tensor& alpha, bool l2, double lo, double hi);
#endif
