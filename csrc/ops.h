// Declarations of the C++ kernels bound in ops.cpp. Each takes and returns plain tensors and
// knows nothing about autograd: fastssl/ops/<op>.py registers the torch.library op around it.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

// ntxent: lse_i = log sum_{j != i} exp(inv_tau * z_i . z_j) over the unit rows z_i = r_i x_i, given as
// rows x [N, D] and inverse norms r [N]; the backward returns dL/dx_i = r_i dL/dz_i.
at::Tensor ntxent_lse_fwd_cpu(const at::Tensor& x, const at::Tensor& r, double inv_tau);
at::Tensor ntxent_lse_bwd_cpu(const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& r,
                              const at::Tensor& lse, double inv_tau);

// masking: MAE's random masking (rank of the noise, gather of the visible tokens), the decoder's
// unshuffle, and the masked MSE loss with its gradient (csrc/cpu/masking.cpp).
at::Tensor masking_rank_cpu(const at::Tensor& noise);
std::tuple<at::Tensor, at::Tensor> masking_gather_cpu(const at::Tensor& x, const at::Tensor& ids_restore, int64_t keep,
                                                      int64_t num_prefix, bool sum_masked);
at::Tensor masking_unshuffle_cpu(const at::Tensor& visible, const at::Tensor& ids_restore,
                                 const at::Tensor& mask_token, int64_t num_prefix);
std::tuple<at::Tensor, at::Tensor> masked_mse_fwd_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                      const at::Tensor& weight, const at::Tensor& weight_sum,
                                                      bool norm_pix, bool need_grad);

// pgd: one projected-gradient step on x_adv [B, ...] in place (L-inf, or L2 when l2), with
// per-sample eps [B] and alpha [B], clamped to [lo, hi]; grad and x_orig are like x_adv.
void pgd_step_cpu(at::Tensor x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                  const at::Tensor& eps, const at::Tensor& alpha, bool l2, double lo, double hi);
#ifdef WITH_CUDA
// the same on CUDA, on the stream torch.cuda.current_stream().cuda_stream passed as an integer
void pgd_step_cuda(at::Tensor x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                   const at::Tensor& eps, const at::Tensor& alpha, bool l2, double lo, double hi,
                   int64_t stream);
#endif
// mochi: synthetic-negative logits q_b.norm(w a^ + (1 - w) n^) [B, S] and the backward's
// coefficients [B, S, 2]; a = queue[first] (q_bar[b] where first = -1), n = queue[second], x^ = x/|x|,
// row_scale [K] the queue rows' power-of-two scales (applied before the rows are squared).
std::tuple<at::Tensor, at::Tensor> mochi_mix_fwd_cpu(const at::Tensor& q, const at::Tensor& q_bar,
                                                     const at::Tensor& queue, const at::Tensor& first,
                                                     const at::Tensor& second, const at::Tensor& weight,
                                                     const at::Tensor& row_scale);
at::Tensor mochi_mix_bwd_cpu(const at::Tensor& grad, const at::Tensor& q_bar, const at::Tensor& queue,
                             const at::Tensor& first, const at::Tensor& second, const at::Tensor& coef);
// mochi: over a chunk of the loss's raw queue products s_rk = qs_r . n_k [R, K] (in place, in the
// queue's dtype; rows widened to fp32 on the way for bf16/fp16), with
// bound_r >= max_k s_rk scale_k (|qs_r|) and the queue's inverse norms scale [K]: the logits
// l_rk = s_rk scale_k, their n largest columns (the hard set), and the synthetic negatives of
// positions first, second [R, S] in it (docs/design.md, "MoCHi"; q_bar [R, D] the query rows in the
// queue's dtype, row_scale [K] the queue rows' power-of-two scales). Returns lse_r over all the
// negatives and q_coef [R], with s_rk <- its gradient's weights: dlse_r/dqs_r = sum_k s_rk n_k +
// q_coef_r q_bar_r.
std::tuple<at::Tensor, at::Tensor> mochi_queue_rows_cpu(at::Tensor s, const at::Tensor& bound,
                                                        const at::Tensor& scale, int64_t n, const at::Tensor& qs,
                                                        const at::Tensor& q_bar, const at::Tensor& queue,
                                                        const at::Tensor& row_scale, const at::Tensor& first,
                                                        const at::Tensor& second, const at::Tensor& weight);
// rows: for x [N, D], (scale [N], inv [N]) in fp32 (fp64 for fp64): each row's power-of-two scale and
// inverse norm, 0 for a zero or NaN row, as fastssl/_rows.py's power_of_two_scales and inverse_norms,
// in one pass (csrc/rows.cpp).
std::tuple<at::Tensor, at::Tensor> row_scales_cpu(const at::Tensor& x);
// mochi: the columns of the n largest scores of every row of scores [B, K], [B, n] int64, unordered.
at::Tensor mochi_hard_set_cpu(const at::Tensor& scores, int64_t n);
// info_nce: row_i = log sum_j exp(inv_tau * q_i . k_j) and, with with_cols, col_j = log sum_i exp(...)
// over unit rows q [M, D], k [N, D]; pairs (i, i + self_offset) left out when self_offset >= 0.
std::tuple<at::Tensor, at::Tensor> info_nce_lse_fwd_cpu(const at::Tensor& q, const at::Tensor& k, double inv_tau,
                                                        bool with_cols, int64_t self_offset);
// backward: (dL/dq, dL/dk, dL/d(inv_tau)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_lse_bwd_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& row_lse, const at::Tensor& col_lse, double inv_tau, int64_t self_offset);
// dino: prototype losses fused with the last layer (csrc/cpu/dino.cpp): the teacher's softmax
// normaliser LSE_k(t / tau + shift_k) and row max, the Sinkhorn sums of exp(t / tau - m) u_k v_r
// over rows [K] and over prototypes [R], Sinkhorn-Knopp on one process (a [K], beta [R]), and the
// student's (lse [N], dots [G, N], beta [R]: the teacher's softmax normaliser found in the same pass
// when beta is empty) and their backward.
std::tuple<at::Tensor, at::Tensor> dino_teacher_lse_cpu(const at::Tensor& teacher, const at::Tensor& teacher_weight,
                                                        const at::Tensor& shift, double inv_tau);
std::tuple<at::Tensor, at::Tensor> dino_sinkhorn_sums_cpu(const at::Tensor& teacher, const at::Tensor& teacher_weight,
                                                          double inv_tau, double shift, const at::Tensor& u,
                                                          const at::Tensor& v);
std::tuple<at::Tensor, at::Tensor> dino_sinkhorn_cpu(const at::Tensor& teacher, const at::Tensor& teacher_weight,
                                                     double inv_tau, int64_t iterations);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dino_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& weight,
                                                                 const at::Tensor& teacher,
                                                                 const at::Tensor& teacher_weight, const at::Tensor& a,
                                                                 const at::Tensor& beta, double inv_tau_s,
                                                                 double inv_tau_t);
std::tuple<at::Tensor, at::Tensor> dino_loss_bwd_cpu(const at::Tensor& grad_lse, const at::Tensor& grad_dots,
                                                     const at::Tensor& student, const at::Tensor& weight,
                                                     const at::Tensor& teacher, const at::Tensor& teacher_weight,
                                                     const at::Tensor& a, const at::Tensor& beta,
                                                     const at::Tensor& lse, double inv_tau_s, double inv_tau_t);
// siglip: row_i = -sum_j log sigmoid(z_ij (scale x_i . y_j + bias)) over unit rows x [M, D], y [N, D],
// z_ij = +1 for j = i + offset and -1 elsewhere; scale and bias one-element tensors.
at::Tensor siglip_fwd_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias,
                          int64_t offset);
// backward: (dL/dx, dL/dy, dL/dscale, dL/dbias), the last two 0-dim fp32 (fp64 for fp64 input).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_cpu(const at::Tensor& grad_row,
                                                                          const at::Tensor& x, const at::Tensor& y,
                                                                          const at::Tensor& scale,
                                                                          const at::Tensor& bias, int64_t offset);
// forward and backward in one pass, for g_i = 1 (a mean or sum loss: the upstream gradient is one
// number): (row_i, then siglip_bwd_cpu's four results at grad_row = 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_fused_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias, int64_t offset);
// kmeans: one greedy k-means++ step over rows x [n, D] with squared norms x_sq [n], squared
// distances d2 [n] to the nearest seed and candidates [L, D] (all fp32): writes
// out_li = min(d2_i, ||x_i - c_l||^2) into out [L, n] and returns the potentials sum_i out_li [L] fp64,
// summed in an order that does not depend on the number of threads.
at::Tensor kmeans_pp_step_cpu(const at::Tensor& x, const at::Tensor& x_sq, const at::Tensor& d2,
                              const at::Tensor& candidates, at::Tensor out);
// knn: the k largest inner products of each query row [Q, D] with the train rows [N, D] (unit fp32
// rows), best first: (similarities [Q, k] fp32, indices [Q, k] int64), exact; bf16 tiles find the
// candidates, fp32 dot products rank them (csrc/cpu/knn.cpp).
std::tuple<at::Tensor, at::Tensor> knn_search_cpu(const at::Tensor& query, const at::Tensor& train, int64_t k);
// whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16): knn_search_cpu's bf16 tiles
// are fast only then.
bool knn_bf16_dots_supported();
