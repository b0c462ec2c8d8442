// Masked image modelling on the CPU: MAE's rank, gather and unshuffle, and the masked MSE loss with
// its gradient in one sweep (He et al. 2022). The math is docs/design.md, "Masking"; the ops around
// these kernels are in fastssl/ops/masking.py.
//
// A sequence of N = P + L rows holds P prefix tokens (a class token), always kept, and L patch tokens;
// patch i, with rank r_i = ids_restore[b, i], is visible when r_i < keep and sits at row P + r_i of
// the visible sequence [B, P + keep, D].
//  masking_rank:      r_i = #{j : n_j < n_i, or n_j = n_i and j < i}, MAE's argsort(argsort(noise)).
//  masking_gather:    visible[b, P + r_i] = x[b, P + i] for r_i < keep, prefix rows copied as they are;
//                     optionally the sum of the masked rows (the mask token's gradient).
//  masking_unshuffle: out[b, P + i] = visible[b, P + r_i] if r_i < keep else the mask token.
// Values of ids_restore outside [0, keep) count as masked, so a corrupted index can never read or
// write outside the tensors. Rows are moved with memcpy, for every dtype.
//  masked_mse_fwd:    w_r ℓ_r per row and, when asked, ∂loss/∂p = 2 w_r (p − t̂)/(P Σw); rows with
//                     w_r = 0 are not read: their loss and gradient are 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "../ops.h"
#include "memory.h"
#include "vec_math.h"

namespace {

// Rows per parallel chunk so that a chunk moves at least ~64 KiB.
int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, row_bytes)); }

void check_tokens(const at::Tensor& x, const at::Tensor& ids_restore, int64_t num_prefix, const char* fn) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu(), fn, ": x must be a [B, N, D] CPU tensor, got ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1, fn, ": the last dim of x must be contiguous");
  TORCH_CHECK(ids_restore.scalar_type() == at::kLong && ids_restore.dim() == 2 &&
                  ids_restore.size(0) == x.size(0) && ids_restore.is_contiguous(),
              fn, ": ids_restore must be a contiguous int64 [B, L] tensor, got ", ids_restore.sizes());
  TORCH_CHECK(num_prefix >= 0, fn, ": num_prefix must be >= 0");
}

// Reads n values of any floating dtype into acc (float or double).
template <class acc_t>
void load_row(const at::Tensor& t, int64_t offset, int64_t n, acc_t* acc) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "load_row", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>() + offset;
    for (int64_t k = 0; k < n; ++k) acc[k] = static_cast<acc_t>(src[k]);
  });
}

// The values of row [offset, offset + n) of t as acc_t: in place when t holds acc_t, else widened
// into buffer.
template <class acc_t>
const acc_t* row_values(const at::Tensor& t, int64_t offset, int64_t n, acc_t* buffer) {
  if (t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) return t.const_data_ptr<acc_t>() + offset;
  load_row(t, offset, n, buffer);
  return buffer;
}

// One row of the masked MSE in three sweeps over its P values (in cache): with norm_pix the target's
// mean, then its variance about that mean (two sweeps: no cancellation in E[t²] − E[t]²); then
// d_k = p_k − t̂_k, written as scale·d_k to out (the gradient, or scratch), and Σ_k d_k² returned.
// Fixed lanes (fastssl::kLanes), so every clone gives the same sums.
template <class acc_t>
FASTSSL_ROW_KERNEL acc_t mse_row(const acc_t* p, const acc_t* t, int64_t n, bool norm_pix, acc_t scale, acc_t* out) {
  using fastssl::kLanes;
  acc_t mean = 0, rstd = 1;
  if (norm_pix) {
    mean = fastssl::lane_sum(t, n) / n;
    acc_t part[kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes)
      for (int j = 0; j < kLanes; ++j) part[j] += (t[k + j] - mean) * (t[k + j] - mean);
    acc_t var = 0;
    for (; k < n; ++k) var += (t[k] - mean) * (t[k] - mean);
    for (int j = 0; j < kLanes; ++j) var += part[j];
    rstd = 1 / std::sqrt(var / (n - 1) + acc_t(1e-6));
  }
  acc_t part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = p[k + j] - (t[k + j] - mean) * rstd;
      part[j] += d * d;
      out[k + j] = d * scale;
    }
  acc_t sq = 0;
  for (; k < n; ++k) {
    const acc_t d = p[k] - (t[k] - mean) * rstd;
    sq += d * d;
    out[k] = d * scale;
  }
  for (int j = 0; j < kLanes; ++j) sq += part[j];
  return sq;
}

template <class acc_t>
void masked_mse_rows(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight, acc_t weight_sum,
                     bool norm_pix, at::Tensor& row_loss, at::Tensor* grad) {
  const int64_t rows = weight.numel(), p = pred.size(-1);
  const acc_t* w = weight.const_data_ptr<acc_t>();
  acc_t* out = row_loss.data_ptr<acc_t>();
  // the gradient is written in place when it is acc_t, else through a buffer and rounded
  const bool direct = grad && grad->scalar_type() == c10::CppTypeToScalarType<acc_t>::value;
  at::parallel_for(0, rows, grain_rows(4 * p * pred.element_size()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> pb(p), tb(p), gb(p);
    for (int64_t r = begin; r < end; ++r) {
      if (w[r] == 0) {  // not a masked patch: contributes nothing, and is not read
        out[r] = 0;
        if (grad) std::memset(static_cast<char*>(grad->data_ptr()) + r * p * grad->element_size(), 0,
                              p * grad->element_size());
        continue;
      }
      const acc_t scale = grad ? 2 * w[r] / (p * weight_sum) : acc_t(0);
      acc_t* g = direct ? grad->data_ptr<acc_t>() + r * p : gb.data();
      const acc_t* pv = row_values(pred, r * p, p, pb.data());
      const acc_t* tv = row_values(target, r * p, p, tb.data());
      out[r] = w[r] * mse_row(pv, tv, p, norm_pix, scale, g) / p;
      if (grad && !direct) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad->scalar_type(), "masked_mse_grad", [&] {
          scalar_t* dst = grad->data_ptr<scalar_t>() + r * p;
          for (int64_t k = 0; k < p; ++k) dst[k] = static_cast<scalar_t>(g[k]);
        });
      }
    }
  });
}

}  // namespace

at::Tensor masking_rank_cpu(const at::Tensor& noise_in) {
  TORCH_CHECK(noise_in.dim() == 2 && noise_in.device().is_cpu(), "masking_rank_cpu: noise must be a [B, L] CPU tensor");
  const at::Tensor noise = noise_in.to(at::kFloat).contiguous();
  const int64_t b = noise.size(0), l = noise.size(1);
  at::Tensor ids_restore = at::empty({b, l}, noise.options().dtype(at::kLong));
  const float* n = noise.const_data_ptr<float>();
  int64_t* out = ids_restore.data_ptr<int64_t>();
  at::parallel_for(0, b, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, l)), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(l);
    for (int64_t s = begin; s < end; ++s) {
      const float* ns = n + s * l;
      std::iota(order.begin(), order.end(), 0);
      // stable: equal noise keeps index order, as torch.argsort(stable=True)
      std::stable_sort(order.begin(), order.end(), [ns](int64_t i, int64_t j) { return ns[i] < ns[j]; });
      for (int64_t r = 0; r < l; ++r) out[s * l + order[r]] = r;
    }
  });
  return ids_restore;
}

std::tuple<at::Tensor, at::Tensor> masking_gather_cpu(const at::Tensor& x, const at::Tensor& ids_restore, int64_t keep,
                                                      int64_t num_prefix, bool sum_masked) {
  check_tokens(x, ids_restore, num_prefix, "masking_gather_cpu");
  const int64_t b = x.size(0), d = x.size(2), l = ids_restore.size(1);
  TORCH_CHECK(x.size(1) == num_prefix + l, "masking_gather_cpu: x has ", x.size(1), " tokens, expected ",
              num_prefix + l);
  TORCH_CHECK(keep >= 0 && keep <= l, "masking_gather_cpu: keep must be in [0, L]");
  const int64_t n_out = num_prefix + keep, row_bytes = d * x.element_size();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = fastssl::empty_output({b, n_out, d}, x.options());
  at::Tensor partial = at::zeros({sum_masked ? b : 0, d}, x.options().dtype(acc));
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* ids = ids_restore.const_data_ptr<int64_t>();
  const int64_t sb = x.stride(0) * x.element_size(), sn = x.stride(1) * x.element_size();
  at::parallel_for(0, b, grain_rows((num_prefix + l) * row_bytes), [&](int64_t begin, int64_t end) {
    std::vector<double> masked(sum_masked ? d : 0);
    for (int64_t s = begin; s < end; ++s) {
      for (int64_t j = 0; j < num_prefix; ++j)
        std::memcpy(dst + (s * n_out + j) * row_bytes, src + s * sb + j * sn, row_bytes);
      std::fill(masked.begin(), masked.end(), 0.0);
      for (int64_t i = 0; i < l; ++i) {
        const int64_t r = ids[s * l + i];
        const char* row = src + s * sb + (num_prefix + i) * sn;
        if (static_cast<uint64_t>(r) < static_cast<uint64_t>(keep)) {
          std::memcpy(dst + (s * n_out + num_prefix + r) * row_bytes, row, row_bytes);
        } else if (sum_masked) {
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_sum", [&] {
            const scalar_t* v = reinterpret_cast<const scalar_t*>(row);
            for (int64_t k = 0; k < d; ++k) masked[k] += static_cast<double>(v[k]);
          });
        }
      }
      if (sum_masked) {
        at::Tensor dst_row = partial.select(0, s);
        dst_row.copy_(at::from_blob(masked.data(), {d}, at::TensorOptions().dtype(at::kDouble)));
      }
    }
  });
  return {out, partial};
}

at::Tensor masking_unshuffle_cpu(const at::Tensor& visible, const at::Tensor& ids_restore,
                                 const at::Tensor& mask_token_in, int64_t num_prefix) {
  check_tokens(visible, ids_restore, num_prefix, "masking_unshuffle_cpu");
  const int64_t b = visible.size(0), d = visible.size(2), l = ids_restore.size(1);
  const int64_t keep = visible.size(1) - num_prefix;
  TORCH_CHECK(keep >= 0 && keep <= l, "masking_unshuffle_cpu: visible has ", visible.size(1),
              " tokens, expected num_prefix + keep with keep in [0, ", l, "]");
  TORCH_CHECK(mask_token_in.numel() == d && mask_token_in.scalar_type() == visible.scalar_type(),
              "masking_unshuffle_cpu: mask_token must hold D values of visible's dtype");
  const at::Tensor mask_token = mask_token_in.contiguous();
  const int64_t n_out = num_prefix + l, row_bytes = d * visible.element_size();
  at::Tensor out = fastssl::empty_output({b, n_out, d}, visible.options());
  const char* src = static_cast<const char*>(visible.const_data_ptr());
  const char* token = static_cast<const char*>(mask_token.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* ids = ids_restore.const_data_ptr<int64_t>();
  const int64_t sb = visible.stride(0) * visible.element_size(), sn = visible.stride(1) * visible.element_size();
  at::parallel_for(0, b * n_out, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = row / n_out, j = row % n_out;
      const char* from = token;
      if (j < num_prefix) {
        from = src + s * sb + j * sn;
      } else {
        const int64_t r = ids[s * l + j - num_prefix];
        if (static_cast<uint64_t>(r) < static_cast<uint64_t>(keep)) from = src + s * sb + (num_prefix + r) * sn;
      }
      std::memcpy(dst + row * row_bytes, from, row_bytes);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_mse_fwd_cpu(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                      const at::Tensor& weight_in, const at::Tensor& weight_sum,
                                                      bool norm_pix, bool need_grad) {
  TORCH_CHECK(pred_in.dim() == 3 && pred_in.sizes() == target_in.sizes() && pred_in.device().is_cpu(),
              "masked_mse_fwd_cpu: pred and target must be [B, L, P] CPU tensors of one shape");
  TORCH_CHECK(weight_in.numel() == pred_in.size(0) * pred_in.size(1), "masked_mse_fwd_cpu: weight must be [B, L]");
  TORCH_CHECK(!norm_pix || pred_in.size(2) > 1, "masked_mse_fwd_cpu: norm_pix needs P > 1");
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const bool fp64 = pred.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  const at::Tensor weight = weight_in.to(acc).contiguous().view(-1);
  at::Tensor row_loss = at::empty({weight.numel()}, weight.options());
  at::Tensor grad = fastssl::empty_output(need_grad ? pred.sizes() : at::IntArrayRef{0}, pred.options());
  at::Tensor grad_rows = need_grad ? grad.view({-1, pred.size(2)}) : grad;
  at::Tensor* g = need_grad ? &grad_rows : nullptr;
  if (fp64) {
    masked_mse_rows<double>(pred, target, weight, weight_sum.item<double>(), norm_pix, row_loss, g);
  } else {
    masked_mse_rows<float>(pred, target, weight, weight_sum.item<float>(), norm_pix, row_loss, g);
  }
  return {row_loss, grad};
}
