// The elementwise passes of the fixed-shift tile kernels (csrc/tiles.h: exp_sums, exp_weights).
//
// The extension is built for the baseline ISA (no -march), so these loops are compiled once per
// x86-64 level by target_clones and the loader picks the widest the CPU has (AVX-512, AVX2, SSE2).
// std::exp does not vectorise without -ffast-math; fp32 uses Cephes' expf instead: x = n ln2 + r with
// ln2 in two parts, a degree-6 polynomial in r, then 2^n through the exponent bits, within 2 ulp and
// branch-free. Arguments here are s - m ≤ 0 up to rounding (m bounds s); below −87.33 the result is
// exp(−87.33), an absolute error under 1.2e-38, and NaN stays NaN. fp64 (gradcheck) uses std::exp.
#include <ATen/ATen.h>

#include <bit>
#include <cmath>
#include <cstdint>

#include "tiles.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTSSL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTSSL_CLONES
#endif

namespace fastssl {
namespace {

inline float exp_of(float x) {
  x = std::min(std::max(x, -87.33f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x log2 e)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}
inline double exp_of(double x) { return std::exp(x); }

bool left_out(int64_t i, int64_t drop, int64_t c) { return drop != kKeepAll && i + drop >= 0 && i + drop < c; }

template <class T>
void exp_sums_rows(T* e, int64_t r, int64_t c, T shift, int64_t drop, T* row, T* col) {
  for (int64_t i = 0; i < r; ++i) {
    T* p = e + i * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) p[j] = exp_of(p[j] - shift);
    // zeroed before the sums: subtracting it after would cancel the row's small terms
    if (left_out(i, drop, c)) p[i + drop] = 0;
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < c; ++j) total += p[j];
    row[i] = total;
    if (col != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) col[j] += p[j];
    }
  }
}

template <class T>
void exp_weights_rows(T* a, int64_t r, int64_t c, T shift, const T* u, const T* v, int64_t drop) {
  for (int64_t i = 0; i < r; ++i) {
    T* p = a + i * c;
    const T ui = u[i];
    if (v != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) p[j] = exp_of(p[j] - shift) * (ui + v[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) p[j] = exp_of(p[j] - shift) * ui;
    }
    if (left_out(i, drop, c)) p[i + drop] = 0;
  }
}

// The clones: one non-template function per dtype (target_clones takes no templates).
FASTSSL_CLONES void exp_sums_f32(float* e, int64_t r, int64_t c, float shift, int64_t drop, float* row, float* col) {
  exp_sums_rows(e, r, c, shift, drop, row, col);
}
FASTSSL_CLONES void exp_weights_f32(float* a, int64_t r, int64_t c, float shift, const float* u, const float* v,
                                    int64_t drop) {
  exp_weights_rows(a, r, c, shift, u, v, drop);
}

void check_tile(const at::Tensor& s) {
  TORCH_INTERNAL_ASSERT(s.is_contiguous() && s.dim() == 2 &&
                        (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble));
}

}  // namespace

std::pair<at::Tensor, at::Tensor> exp_sums(at::Tensor& s, double shift, int64_t drop, bool cols) {
  check_tile(s);
  const int64_t r = s.size(0), c = s.size(1);
  at::Tensor row = at::empty({r, 1}, s.options());
  at::Tensor col = cols ? at::zeros({c, 1}, s.options()) : at::Tensor();
  if (s.scalar_type() == at::kFloat) {
    exp_sums_f32(s.data_ptr<float>(), r, c, static_cast<float>(shift), drop, row.data_ptr<float>(),
                 cols ? col.data_ptr<float>() : nullptr);
  } else {
    exp_sums_rows(s.data_ptr<double>(), r, c, shift, drop, row.data_ptr<double>(),
                  cols ? col.data_ptr<double>() : nullptr);
  }
  return {row, col};
}

void exp_weights(at::Tensor& s, double shift, const at::Tensor& u, const at::Tensor& v, int64_t drop) {
  check_tile(s);
  const int64_t r = s.size(0), c = s.size(1);
  const at::Tensor uc = u.to(s.scalar_type()).contiguous();
  const at::Tensor vc = v.defined() ? v.to(s.scalar_type()).contiguous() : at::Tensor();
  TORCH_INTERNAL_ASSERT(uc.numel() == r && (!vc.defined() || vc.numel() == c));
  if (s.scalar_type() == at::kFloat) {
    exp_weights_f32(s.data_ptr<float>(), r, c, static_cast<float>(shift), uc.data_ptr<float>(),
                    vc.defined() ? vc.data_ptr<float>() : nullptr, drop);
  } else {
    exp_weights_rows(s.data_ptr<double>(), r, c, shift, uc.data_ptr<double>(),
                     vc.defined() ? vc.data_ptr<double>() : nullptr, drop);
  }
}

}  // namespace fastssl
