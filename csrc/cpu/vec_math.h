// Branch-free elementwise math for the fp32 row loops of the tiled CPU kernels (csrc/cpu/*.cpp, csrc/tiles.cpp):
// without -ffast-math std::exp and std::log1p do not vectorise, these do. fp64 overloads call std::
// (gradcheck runs in fp64; its speed does not matter).
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

// FASTSSL_ROW_KERNEL functions are also compiled for AVX2+FMA and AVX-512 and picked at load time
// (GCC's target_clones), so that an extension built for baseline x86-64 still runs its row loops 8
// or 16 wide (setup.py's -fno-trapping-math lets GCC if-convert the selects below).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTSSL_ROW_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTSSL_ROW_KERNEL
#endif

#if defined(__x86_64__)
#include <xmmintrin.h>  // _mm_getcsr, _mm_setcsr
#endif

namespace fastssl {

// Flush-to-zero and denormals-are-zero for the calling thread while in scope (x86; elsewhere
// nothing). Products of the row loops' small exponentials (p·c with p near FLT_MIN) are denormal,
// and every operation on a denormal takes a microcode assist: the DINO loss with logits of a few
// hundred (unnormalised features) ran 30 × slower than with unit rows. A value below FLT_MIN
// (1.2e-38) then counts as 0, where it is below fp32's resolution of any sum it enters that also
// holds the row's largest term (exp(0) = 1).
class FlushDenormals {
 public:
#if defined(__x86_64__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ (bit 15), DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  FlushDenormals() {}  // user-provided, so that `const FlushDenormals flush;` compiles everywhere
#endif
};

constexpr int kLanes = 16;  // independent partial sums: one AVX-512 register, two AVX2 ones

// exp of fp32 tiles: Cephes' expf (x = n ln2 + r with ln2 in two parts, a degree-6 polynomial in r,
// then 2^n through the exponent bits), within 2 ulp and branch-free, so that the row loops
// vectorise. Meant for arguments ≤ 0 up to rounding: below −87.33 the result is exp(−87.33), an
// absolute error under 1.2e-38, and NaN stays NaN.
inline float exp_tile(float x) {
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
inline double exp_tile(double x) { return std::exp(x); }

// log1p of fp32 tiles for 0 ≤ e ≤ 1 (e = exp(−|x|) in softplus): musl's log1pf with its two cases
// selected instead of branched on. With 1 + e = 2^k (1 + f), k = 0 and f = e below √2 − 1, else
// k = 1, f = (1 + e)/2 − 1 (exact) and c = (e − ((1 + e) − 1))/(1 + e) restores the digits of e
// that rounding 1 + e dropped; log(1 + f) = 2 atanh(s), s = f/(2 + f), as a polynomial in s².
// Within 1 ulp of log1p(e), e itself for tiny e (no loss to 1's ulp); NaN stays NaN.
inline float log1p_tile(float e) {
  // both cases computed, then selected: a select of computed values is what the vectoriser takes
  const bool big = e >= 0.41421356f;
  const float u = 1.0f + e, f_big = 0.5f * u - 1.0f, c_big = (e - (u - 1.0f)) / u;
  const float f = big ? f_big : e, c = big ? c_big : 0.0f, k = big ? 1.0f : 0.0f;
  const float s = f / (2.0f + f), z = s * s, w = z * z;
  const float r = z * (0.66666662693f + w * 0.28498786688f) + w * (0.40000972152f + w * 0.24279078841f);
  const float hfsq = 0.5f * f * f;
  return s * (hfsq + r) + (k * 9.0580006145e-06f + c) - hfsq + f + k * 6.9313812256e-01f;
}
inline double log1p_tile(double e) { return std::log1p(e); }

// kLanes values of T as one GCC vector: arithmetic on it is elementwise, and an accumulator of this
// type stays in registers across a loop (one zmm for fp32 on AVX-512), where an array of kLanes
// partial sums is loaded and stored back on every step.
template <class T>
struct LanesOf {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};
template <class T>
using Lanes = typename LanesOf<T>::type;

template <class T>
Lanes<T> load_lanes(const T* p) {
  Lanes<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The kLanes partial sums, added pairwise (lane l + lane l + 8, then + 4, + 2, + 1: a fixed tree, a
// few vector adds where a chain of 16 scalar adds was a quarter of a 256-column row's time), then the
// tail a[0..n) (n < kLanes) in order.
template <class T>
T lanes_total(const Lanes<T>& part, const T* tail, int64_t n) {
  alignas(sizeof(Lanes<T>)) T a[kLanes];
  std::memcpy(a, &part, sizeof a);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  }
  T s = a[0];
  for (int64_t k = 0; k < n; ++k) s += tail[k];
  return s;
}

// Σ_k a_k over kLanes partial sums, lane l summing a_l, a_{l+kLanes}, ... in order: the same bits on
// every ISA and clone.
template <class T>
T lane_sum(const T* a, int64_t n) {
  Lanes<T> part = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) part += load_lanes(a + k);
  return lanes_total(part, a + k, n - k);
}

}  // namespace fastssl
