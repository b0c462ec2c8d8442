// The tile products of the CPU kernels (csrc/tiles.h, TileProducts): oneDNN's bf16 micro-kernels
// (ATen's cpublas::brgemm, AMX) for rows that are bf16 numbers, ATen's mm elsewhere.
//
// brgemm computes C (+)= A B for a row-major bf16 A [M, K] (leading dimension ld_a) and a bf16 B
// [K, N] in VNNI layout (rows 2t and 2t + 1 interleaved: element (k, n) of a 64-column panel at
// (k / 2) 128 + 2n + k % 2, as cpublas::pack writes it), into fp32 C. The rows are packed once per call:
//   rows    X as bf16 [M', D'] (M' = M rounded up to kTile, D' = D rounded up to 64, zeros beyond):
//           A of scores, with K = D' (zero columns add nothing).
//   right   Y^T per panel of 64 rows, packed: B of scores, panel p holds columns 64p.. of S.
//   sums    Y per block of kTile rows and panel of 64 columns, packed with K = kTile: B of A Y_J.
//   rows_t  X^T per block of kTile rows [D', kTile]: A of X_I^T A.
// The weights A of a tile are split into bf16 parts A_hi = bf16(A), A_lo = bf16(A - A_hi) (the
// difference is exact in fp32) and A Y_J = A_hi Y_J + A_lo Y_J, with K = kTile (A's columns beyond the
// tile zeroed). For A^T X_I the parts are also written in VNNI panels, so that A is the B of
// X_I^T A = (A^T X_I)^T, and no tile is ever transposed (a transposing store was measured as
// slow as the products it fed).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/vec_math.h"
#include "tiles.h"

namespace fastssl {
namespace {

namespace cpublas = at::native::cpublas;

constexpr int64_t kPanel = 64;  // columns of a packed panel (the most cpublas::pack takes)

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// fp32 -> bf16 bits, round to nearest even (NaN stays NaN: its payload only grows)
inline uint16_t to_bf16(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float from_bf16(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

// hi/lo parts of a [r, c] fp32 tile: into [r, kTile] row-major buffers (A of A Y_J) and, when v_hi,
// into VNNI panels (B of X_I^T A): element (i, j) of panel j / 64 at (i / 2) 128 + 2 (j % 64) + i % 2,
// i.e. one 32-bit word per row pair and column. One pass over row pairs writes both layouts (a pass
// per layout read the parts back). The buffers beyond the tile are left as they are (zeroed by the
// caller; an odd r pairs its last row with a zero row).
FASTSSL_ROW_KERNEL void split_tile(const float* a, int64_t r, int64_t c, uint16_t* hi, uint16_t* lo, uint32_t* v_hi,
                                   uint32_t* v_lo) {
  for (int64_t t = 0; 2 * t < r; ++t) {
    const bool pair = 2 * t + 1 < r;
    const float* p0 = a + 2 * t * c;
    const float* p1 = pair ? p0 + c : p0;  // an odd r's last row: read again, its partner written as 0
    uint16_t *h0 = hi + 2 * t * kTile, *l0 = lo + 2 * t * kTile;
    uint16_t *h1 = h0 + kTile, *l1 = l0 + kTile;
    for (int64_t j0 = 0; j0 < c; j0 += kPanel) {
      const int64_t n = std::min(kPanel, c - j0), at = (j0 / kPanel) * (kTile / 2) * kPanel + t * kPanel;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float x0 = p0[j0 + j], x1 = pair ? p1[j0 + j] : 0.0f;
        const uint16_t b0 = to_bf16(x0), b1 = to_bf16(x1);
        const uint16_t e0 = to_bf16(x0 - from_bf16(b0)), e1 = to_bf16(x1 - from_bf16(b1));
        h0[j0 + j] = b0;
        l0[j0 + j] = e0;
        if (pair) {
          h1[j0 + j] = b1;
          l1[j0 + j] = e1;
        }
        if (v_hi != nullptr) {
          v_hi[at + j] = static_cast<uint32_t>(b0) | (static_cast<uint32_t>(b1) << 16);
          v_lo[at + j] = static_cast<uint32_t>(e0) | (static_cast<uint32_t>(e1) << 16);
        }
      }
    }
  }
}

FASTSSL_ROW_KERNEL bool low_bits_zero(const uint32_t* u, int64_t n) {
  uint32_t any = 0;
#pragma omp simd reduction(| : any)
  for (int64_t i = 0; i < n; ++i) any |= u[i] & 0xFFFFu;
  return any == 0;
}

void pack_panel(int64_t k, int64_t ld_in, const at::BFloat16* in, at::BFloat16* out) {
  cpublas::pack(k, kPanel, ld_in, kPanel, at::kBFloat16, at::kBFloat16, in, out);
}

TileProducts::Packed pack_rows(const at::Tensor& x, bool left, bool right, bool sums) {
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t n_pad = round_up(std::max<int64_t>(n, 1), kTile), d_pad = round_up(std::max<int64_t>(d, 1), kPanel);
  TileProducts::Packed out;
  out.rows = at::zeros({n_pad, d_pad}, x.options().dtype(at::kBFloat16));
  out.rows.narrow(0, 0, n).narrow(1, 0, d).copy_(x);  // exact: x holds bf16 numbers
  const at::BFloat16* rows = out.rows.data_ptr<at::BFloat16>();
  const int64_t panels = d_pad / kPanel;
  if (right) {  // Y^T panels: transposed [D', 64] row-major, then packed
    const at::Tensor t = out.rows.view({n_pad / kPanel, kPanel, d_pad}).transpose(1, 2).contiguous();
    out.right = at::empty_like(t);
    at::parallel_for(0, t.size(0), 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        pack_panel(d_pad, kPanel, t.data_ptr<at::BFloat16>() + p * d_pad * kPanel,
                   out.right.data_ptr<at::BFloat16>() + p * d_pad * kPanel);
      }
    });
  }
  if (right && sums) {  // block J, panel c: rows J kTile.., columns 64c.. of Y, K = kTile
    out.sums = at::empty({n_pad / kTile, panels, kTile * kPanel}, out.rows.options());
    at::parallel_for(0, n_pad / kTile * panels, 4, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t block = b / panels, panel = b % panels;
        pack_panel(kTile, d_pad, rows + block * kTile * d_pad + panel * kPanel,
                   out.sums.data_ptr<at::BFloat16>() + b * kTile * kPanel);
      }
    });
  }
  if (left && sums) {  // X_I^T per block of kTile rows: [D', kTile] row-major, A of X_I^T A
    out.rows_t = out.rows.view({n_pad / kTile, kTile, d_pad}).transpose(1, 2).contiguous();
  }
  if (!left) out.rows = at::Tensor();
  return out;
}

// c [m, d] (ld ld_c) += a [m, kTile] (bf16 hi and lo parts) . the packed block of sums (d <= D')
void weighted_block(int64_t m, int64_t d, const uint16_t* hi, const uint16_t* lo, const at::Tensor& sums,
                    int64_t block, float* c, int64_t ld_c) {
  const int64_t panels = sums.size(1);
  for (int64_t panel = 0; panel * kPanel < d; ++panel) {
    const at::BFloat16* b = sums.data_ptr<at::BFloat16>() + (block * panels + panel) * kTile * kPanel;
    for (const uint16_t* part : {hi, lo}) {
      cpublas::brgemm(m, std::min(kPanel, d - panel * kPanel), kTile, kTile, kPanel, ld_c, true,
                      reinterpret_cast<const at::BFloat16*>(part), b, c + panel * kPanel);
    }
  }
}

}  // namespace

bool bf16_exact(const at::Tensor& x) {
  TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kFloat && x.is_contiguous());
  return low_bits_zero(reinterpret_cast<const uint32_t*>(x.data_ptr<float>()), x.numel());
}

bool TileProducts::available() {
  // not cached: could_pack also reads torch.backends.mkldnn.enabled, which brgemm obeys
  return Bf16Dots::enabled() && cpublas::could_pack(at::kBFloat16);
}

TileProducts::TileProducts(const at::Tensor& x, const at::Tensor& y, bool weighted)
    : x_(x), y_(y), bf16_(false) {
  if (!available() || x.scalar_type() != at::kFloat || y.scalar_type() != at::kFloat) return;
  const bool same = x.is_same(y);
  bf16_ = bf16_exact(x) && (same || bf16_exact(y));
  if (!bf16_) return;
  if (same) {
    px_ = pack_rows(x, true, true, weighted);
  } else {
    px_ = pack_rows(x, true, false, weighted);
    py_ = pack_rows(y, false, true, weighted);
  }
}

at::Tensor TileProducts::scores(int64_t i0, int64_t i1, int64_t j0, int64_t j1, double alpha) const {
  if (!bf16_) return gemm(x_.slice(0, i0, i1), y_.slice(0, j0, j1).t(), alpha);
  const Packed& py = py_.right.defined() ? py_ : px_;
  const int64_t r = i1 - i0, c = j1 - j0, d_pad = px_.rows.size(1);
  at::Tensor s = at::empty({r, c}, x_.options());
  float* out = s.data_ptr<float>();
  const at::BFloat16* a = px_.rows.data_ptr<at::BFloat16>() + i0 * d_pad;
  for (int64_t c0 = 0; c0 < c; c0 += kPanel) {  // panel (j0 + c0) / 64 of Y^T
    cpublas::brgemm(r, std::min(kPanel, c - c0), d_pad, d_pad, kPanel, c, false, a,
                    py.right.data_ptr<at::BFloat16>() + (j0 + c0) * d_pad, out + c0);
  }
  if (alpha != 1.0) s.mul_(alpha);
  return s;
}

// out.rows is [r, D] with unit column stride; out.cols, a row block of cols_like, is [c, D] with unit
// row stride on the micro-kernels (X_I^T A lands there as it comes), any strides on mm.
void TileProducts::weighted(const at::Tensor& a, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                            const TileOut& out) const {
  const bool cols = out.cols.defined();
  if (!bf16_) {
    out.rows.addmm_(a, y_.slice(0, j0, j1));
    if (cols) out.cols.addmm_(a.t(), x_.slice(0, i0, i1));
    return;
  }
  const int64_t r = i1 - i0, c = j1 - j0, d = x_.size(1);
  TORCH_INTERNAL_ASSERT(a.is_contiguous() && a.scalar_type() == at::kFloat && out.rows.stride(1) == 1 &&
                        (!cols || out.cols.stride(0) == 1) && i0 % kTile == 0 && j0 % kTile == 0);
  float* rows = out.rows.data_ptr<float>();
  float* cols_t = cols ? out.cols.data_ptr<float>() : nullptr;  // X_I^T A [D, c], ld out.cols.stride(1)
  const int64_t ld_rows = out.rows.stride(0), ld_cols = cols ? out.cols.stride(1) : 0;
  const Packed& py = py_.sums.defined() ? py_ : px_;
  const int64_t d_pad = px_.rows.size(1);
  // hi and lo row-major, then in VNNI panels, [kTile, kTile] each; zero beyond the tile (K is kTile)
  thread_local std::vector<uint16_t> buffer(4 * kTile * kTile);
  uint16_t *hi = buffer.data(), *lo = hi + kTile * kTile;
  uint32_t* v_hi = reinterpret_cast<uint32_t*>(lo + kTile * kTile);
  uint32_t* v_lo = v_hi + kTile * kTile / 2;
  if (r < kTile || c < kTile) std::memset(buffer.data(), 0, buffer.size() * sizeof(uint16_t));
  split_tile(a.data_ptr<float>(), r, c, hi, lo, cols ? v_hi : nullptr, cols ? v_lo : nullptr);
  weighted_block(r, d, hi, lo, py.sums, j0 / kTile, rows, ld_rows);
  if (!cols) return;
  // A^T X_I = (X_I^T A)^T: X_I^T [D', kTile] is packed per block (its first D rows used), A as B in
  // its VNNI panels
  const at::BFloat16* x_t = px_.rows_t.data_ptr<at::BFloat16>() + (i0 / kTile) * d_pad * kTile;
  for (int64_t panel = 0; panel * kPanel < c; ++panel) {
    for (const uint32_t* part : {v_hi, v_lo}) {
      cpublas::brgemm(d, std::min(kPanel, c - panel * kPanel), kTile, kTile, kPanel, ld_cols, true, x_t,
                      reinterpret_cast<const at::BFloat16*>(part + panel * kTile * kPanel / 2),
                      cols_t + panel * kPanel);
    }
  }
}

at::Tensor TileProducts::cols_like(int64_t n) const {
  const int64_t d = x_.size(1);
  return bf16_ ? at::zeros({d, n}, x_.options()).t() : at::zeros({n, d}, x_.options());
}

void release_tile_products() {
  if (TileProducts::available()) cpublas::brgemm_release();
}

}  // namespace fastssl
