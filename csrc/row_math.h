// Row loops that vectorise on a baseline-ISA build: the clone attribute and the exp they use
// (csrc/tiles.cpp, csrc/cpu/dino.cpp; docs/design.md, "Tile kernels": elementwise passes).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

// FASTSSL_ROW_KERNEL functions are also compiled for AVX2+FMA and AVX-512 and picked at load time
// (GCC's target_clones), so that a wheel built for baseline x86-64 still runs them 8 or 16 wide.
// setup.py's -fno-trapping-math lets GCC if-convert exp_tile's clamp, so the loops vectorise.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTSSL_ROW_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTSSL_ROW_KERNEL
#endif

namespace fastssl {

// exp of fp32 tiles: Cephes' expf (x = n ln2 + r with ln2 in two parts, a degree-6 polynomial in r,
// then 2^n through the exponent bits), within 2 ulp and branch-free, so that the row loops
// vectorise (std::exp does not without -ffast-math). Every argument in the callers is <= 0 up to
// rounding (a logit minus a bound on it, or a log-probability); below -87.33 the result is
// exp(-87.33), an absolute error under 1.2e-38, and NaN stays NaN. fp64 uses std::exp.
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

}  // namespace fastssl
