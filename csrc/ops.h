// Declarations of the C++ kernels bound in ops.cpp. Each takes and returns plain tensors and
// knows nothing about autograd: fastssl/ops/<op>.py registers the torch.library op around it.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

// ntxent: lse_i = log sum_{j != i} exp(inv_tau * z_i . z_j) over unit rows z [N, D].
at::Tensor ntxent_lse_fwd_cpu(const at::Tensor& z, double inv_tau);
at::Tensor ntxent_lse_bwd_cpu(const at::Tensor& grad_lse, const at::Tensor& z,
                              const at::Tensor& lse, double inv_tau);

// info_nce: row_i = log sum_j exp(inv_tau * q_i . k_j) and, with with_cols, col_j = log sum_i exp(...)
// over unit rows q [M, D], k [N, D]; pairs (i, i + self_offset) left out when self_offset >= 0.
std::tuple<at::Tensor, at::Tensor> info_nce_lse_fwd_cpu(const at::Tensor& q, const at::Tensor& k, double inv_tau,
                                                        bool with_cols, int64_t self_offset);
// backward: (dL/dq, dL/dk, dL/d(inv_tau)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_lse_bwd_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& row_lse, const at::Tensor& col_lse, double inv_tau, int64_t self_offset);
