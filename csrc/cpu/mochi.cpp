// MoCHi synthetic negatives on the CPU: their logits and gradient, without building them.
//
// Kalantidis et al. 2020, "Hard Negative Mixing for Contrastive Learning". Synthetic negative s of
// query b mixes two rows: n = queue[second_bs] and a = queue[first_bs], or a = q_bar_b (the
// detached query) where first_bs = -1. The math is docs/design.md, "MoCHi": rows are normalised on
// the fly (no normalised copy of the queue). A queue row enters scaled by row_scale[k], a power of
// two from the op (exact; the row's largest entry then in [0.5, 1)), so that the squares below
// neither overflow nor underflow for rows of any norm; then, with
// x^ = x / max(|x|, eps) as F.normalize, the negative is h = v / |v| where
//   v = w a^ + (1 - w) n^ = c_a a + c_n n,   c_a = w / |a|,  c_n = (1 - w) / |n|,
//   logit_bs = q.h = (c_a q.a + c_n q.n) / |v|,   |v|^2 = c_a^2 a.a + c_n^2 n.n + 2 c_a c_n a.n,
// (a, n the scaled rows) so five dot products of the two rows and q (q.a, q.n, a.a, n.n, a.n) give
// it, O(D) per negative; 1/tau is applied by the op. h is a constant (detached), so with
// g_bs = dL/dlogit_bs
//   dL/dq_b = sum_s g_bs h_bs = sum_s g_bs (k_a a_raw + k_n n_raw),
// k_a = c_a scale_a / |v|, k_n = c_n scale_n / |v| (relative to the rows as stored): the
// forward saves (k_a, k_n) and the backward forms h again from the two rows.
//
// Threads split the queries; each owns its output rows, so there are no races. Work memory is
// three rows per thread (fp16/bf16 rows are widened to fp32 there), never a [B, S, D] tensor.
//
// The hard sets H(q), the n largest scores of each row, come from mochi_hard_set_cpu, a
// selection in O(K) per row that beats torch.topk (which builds and sorts (value, index) pairs):
//  a. the value t of rank ~1.25 n + margin among a sample of the row (4096 entries, in 256 runs of
//     16 adjacent ones spread evenly) bounds the n-th largest from below with high probability;
//  b. one pass keeps the columns with s >= t (about 1.5 n of them);
//  c. the n-th largest among those, then the columns above it and as many equal to it as make n.
// Ranks (a, c) are found on order-preserving integer keys, one bit per counting pass, without a
// data-dependent branch (std::nth_element's comparisons of random values are mispredicted about
// half the time; `mochi_queue_rows` 18.7 -> 14.2 ms per step, benchmarks/profile_mochi.py). When
// fewer than n pass (b) (ties, or an unlucky sample), (c) runs over the whole row, so the result is
// always exact. NaN ranks above every number, as in torch.topk.
//
// The loss's negatives, lse_b = log (sum_k exp(s_bk) + sum_s exp(qs_b . h_bs)) over a chunk of queue
// logits s_bk = qs_b . n^_k and the row's synthetic negatives, the hard sets, and the gradient's
// weights come from mochi_queue_rows_cpu, which takes each row of the raw products q_b . n_k
// through all of it while the row is in cache: the column scale 1/|n_k|, the selection, the
// synthetic logits (qs.a^ and qs.n^ are the row's own logits at the hard columns, so only the rows'
// products a.a, n.n, a.n are formed, three per element where the logits path forms five), the
// exponentials and sums of both parts, and the weights. The synthetic negatives' softmax weights
// times h's coefficients are added onto the weights of the queue columns they mix (the query's
// share kept apart), so that the one product weights . queue that the queue's gradient needs gives
// the direction of both, and no queue row is read a second time. The chunk [rows, K] is larger than
// the caches, and the ATen passes it replaces (scale, top-n, max, subtract, exp, sum, divide,
// scale) each streamed it from memory. s_bk <= |qs_b| and qs_b . h_bs <= |qs_b|, so the fixed shift
// m_b = |qs_b| is an upper bound and exp(s_bk - m_b) >= exp(-2 m_b) is a normal float while
// 2 m_b <= 80 (the tile kernels' fixed shift, csrc/tiles.h); beyond that the row's max is found
// first. The synthetic negatives' time is in fetching their rows (about 900 distinct rows of the
// 1024 in a query's hard set, from L3): `perf annotate` puts 82 % of the row loop's samples on the
// prefetches of the rows kAhead negatives ahead, and kAhead from 1 to 32 gives the same time.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>  // at::vec::convert
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "vec_math.h"

namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps

using fastssl::kLanes;
using fastssl::Lanes;
using fastssl::load_lanes;

// A row of x in acc_t: the row itself when x already is acc_t, else widened into buf.
template <typename scalar_t, typename acc_t>
const acc_t* widen(const scalar_t* row, int64_t d, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    at::vec::convert(row, buf, d);
    return buf;
  }
}

// The other way: a row of acc_t values into row (nothing when widen handed out row itself).
template <typename acc_t, typename scalar_t>
void narrow(const acc_t* values, int64_t d, scalar_t* row) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(values, row, d);
}

template <typename acc_t>
struct Dots {
  acc_t qa, qn, aa, nn, an;
};

// kLanes values of a row in acc_t: the values themselves for acc_t rows; bf16 rows widened exactly
// on the way (a bf16 is the top half of the fp32 of the same value).
template <typename acc_t, typename scalar_t>
Lanes<acc_t> load_widened(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    typedef uint16_t Half __attribute__((vector_size(kLanes * sizeof(uint16_t))));
    typedef uint32_t Bits __attribute__((vector_size(kLanes * sizeof(uint32_t))));
    Half h;
    std::memcpy(&h, p, sizeof h);
    const Bits bits = __builtin_convertvector(h, Bits) << 16;
    Lanes<acc_t> v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  } else {
    static_assert(std::is_same_v<scalar_t, acc_t>);
    return load_lanes(p);
  }
}

// The rows of scalar_t that dots reads as they are stored (others are widened into a buffer first).
template <typename scalar_t, typename acc_t>
constexpr bool kDirectRows = std::is_same_v<scalar_t, acc_t> || std::is_same_v<scalar_t, c10::BFloat16>;

// out += x a + y n (rows as dots reads them)
template <typename acc_t, typename row_t>
FASTSSL_ROW_KERNEL void axpy2(acc_t* out, acc_t x, const row_t* a, acc_t y, const row_t* n, int64_t d) {
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    const Lanes<acc_t> o = load_lanes(out + i) + (x * load_widened<acc_t>(a + i) + y * load_widened<acc_t>(n + i));
    std::memcpy(out + i, &o, sizeof o);
  }
  for (; i < d; ++i) out[i] += x * static_cast<acc_t>(a[i]) + y * static_cast<acc_t>(n[i]);
}

// The dot products of q, x = a sa and y = n sn (the rows times their scales): all five with kQuery,
// else x.x, y.y and x.y only (q unread). Over kLanes partial sums held in registers (GCC vectors),
// the tail zero-padded into one more step.
template <bool kQuery, typename acc_t, typename row_t>
FASTSSL_ROW_KERNEL Dots<acc_t> dots(const acc_t* q, const row_t* a, acc_t sa, const row_t* n, acc_t sn, int64_t d) {
  using V = Lanes<acc_t>;
  V qa = {}, qn = {}, aa = {}, nn = {}, an = {};
  const auto add = [&](const V& qv, const V& av, const V& nv) {
    const V x = av * sa, y = nv * sn;
    if constexpr (kQuery) {
      qa += qv * x;
      qn += qv * y;
    }
    aa += x * x;
    nn += y * y;
    an += x * y;
  };
  int64_t i0 = 0;
  for (; i0 + kLanes <= d; i0 += kLanes) {
    V qv = {};
    if constexpr (kQuery) qv = load_lanes(q + i0);
    add(qv, load_widened<acc_t>(a + i0), load_widened<acc_t>(n + i0));
  }
  if (i0 < d) {
    acc_t tail_q[kLanes] = {};
    row_t tail[2][kLanes] = {};
    if constexpr (kQuery) std::copy(q + i0, q + d, tail_q);
    std::copy(a + i0, a + d, tail[0]);
    std::copy(n + i0, n + d, tail[1]);
    add(load_lanes(tail_q), load_widened<acc_t>(tail[0]), load_widened<acc_t>(tail[1]));
  }
  // each as lanes_total's pairwise tree (lane l + lane l + 8, then + 4, + 2, + 1), in registers: a
  // chain of 16 scalar adds per sum was a long part of a D = 128 mix
  const auto total = [](V v) {
    static_assert(kLanes == 16);
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    v += __builtin_shufflevector(v, v, 2, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    v += __builtin_shufflevector(v, v, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return v[0];
  };
  if constexpr (kQuery) return {total(qa), total(qn), total(aa), total(nn), total(an)};
  return {0, 0, total(aa), total(nn), total(an)};
}


// Rows are random: each mix's two rows are fetched into L1 kAhead mixes ahead of their use.
constexpr int64_t kAhead = 4;

template <typename row_t>
void prefetch_rows(const row_t* a, const row_t* n, int64_t d) {
  const char *pa = reinterpret_cast<const char*>(a), *pn = reinterpret_cast<const char*>(n);
  for (int64_t off = 0; off < d * int64_t(sizeof(row_t)); off += 64) {
    __builtin_prefetch(pa + off);
    __builtin_prefetch(pn + off);
  }
}

// Whether every index of x (contiguous int64) lies in [lo, hi): one plain pass (the ATen min and max
// reductions it replaces took 2 ms of a MoCHi step).
inline bool all_in_range(const at::Tensor& x, int64_t lo, int64_t hi) {
  const int64_t* p = x.data_ptr<int64_t>();
  bool ok = true;
  for (int64_t i = 0, n = x.numel(); i < n; ++i) ok &= (p[i] >= lo) & (p[i] < hi);
  return ok;
}

// The inputs of one call, checked and made contiguous.
struct Mix {
  at::Tensor q_bar, queue, first, second;
  int64_t b, s, k, d;

  Mix(const at::Tensor& q_bar_in, const at::Tensor& queue_in, const at::Tensor& first_in,
      const at::Tensor& second_in, const char* fn)
      : q_bar(q_bar_in.contiguous()),
        queue(queue_in.contiguous()),
        first(first_in.contiguous()),
        second(second_in.contiguous()) {
    TORCH_CHECK(q_bar.dim() == 2 && queue.dim() == 2, fn, ": q and queue must be 2-D, got ",
                q_bar.sizes(), " and ", queue.sizes());
    TORCH_CHECK(q_bar.device().is_cpu() && queue.device().is_cpu(), fn, ": CPU tensors only");
    TORCH_CHECK(queue.scalar_type() == q_bar.scalar_type(), fn, ": queue dtype ",
                queue.scalar_type(), " differs from q's ", q_bar.scalar_type());
    b = q_bar.size(0), d = q_bar.size(1), k = queue.size(0);
    TORCH_CHECK(queue.size(1) == d, fn, ": queue has ", queue.size(1), " features, q has ", d);
    TORCH_CHECK(first.dim() == 2 && first.size(0) == b && second.sizes() == first.sizes(), fn,
                ": first and second must be [B, S] with B = ", b, ", got ", first.sizes(), " and ",
                second.sizes());
    TORCH_CHECK(first.scalar_type() == at::kLong && second.scalar_type() == at::kLong, fn,
                ": first and second must be int64");
    s = first.size(1);
    TORCH_CHECK(all_in_range(first, -1, k) && all_in_range(second, 0, k), fn,
                ": queue index out of range for a queue of ", k, " rows");
  }

  // Calls fn(col, a, n, i, j) for every negative of query `row`: a and n the rows of its mix,
  // i = first (-1: the query) and j = second their indices.
  template <typename scalar_t, typename Fn>
  void for_each(int64_t row, Fn fn) const {
    const int64_t* i = first.data_ptr<int64_t>() + row * s;
    const int64_t* j = second.data_ptr<int64_t>() + row * s;
    const scalar_t* rows = queue.data_ptr<scalar_t>();
    const scalar_t* self = q_bar.data_ptr<scalar_t>() + row * d;
    for (int64_t col = 0; col < s; ++col) {
      if (col + kAhead < s) {
        const int64_t i_next = i[col + kAhead];
        prefetch_rows(i_next < 0 ? self : rows + i_next * d, rows + j[col + kAhead] * d, d);
      }
      fn(col, i[col] < 0 ? self : rows + i[col] * d, rows + j[col] * d, i[col], j[col]);
    }
  }
};

// 1 / max(sqrt(sq), eps), as F.normalize; sq >= 0 up to rounding.
template <typename acc_t>
acc_t clamped_inverse_sqrt(acc_t sq) {
  return acc_t(1) / std::max(std::sqrt(std::max(sq, acc_t(0))), acc_t(kNormEps));
}

// Order-preserving unsigned keys: x < y implies key(x) < key(y) (the sign bit flipped for x >= 0, every
// bit for x < 0); NaN of either sign takes the largest key, so it ranks above every number, as in
// torch.topk. −0 sits just below +0; which of two equal values a selection keeps is free.
template <typename T>
using KeyOf = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

template <typename T>
KeyOf<T> order_key(T x) {
  using K = KeyOf<T>;
  constexpr int kTop = 8 * sizeof(K) - 1;
  const K b = std::bit_cast<K>(x);
  const K flip = K(std::make_signed_t<K>(b) >> kTop) | (K(1) << kTop);
  return std::isnan(x) ? ~K(0) : b ^ flip;
}

// The value whose key is t (NaN for the largest key).
template <typename T>
T from_key(KeyOf<T> t) {
  using K = KeyOf<T>;
  constexpr K kSign = K(1) << (8 * sizeof(K) - 1);
  if (t == ~K(0)) return std::numeric_limits<T>::quiet_NaN();
  return std::bit_cast<T>((t & kSign) ? t ^ kSign : ~t);
}

// The r-th largest of keys[0, m) (1 <= r <= m), found bit by bit from the top: t takes a bit when at
// least r keys are >= t with it. One branch-free counting pass per bit (16 keys per compare on
// AVX-512), where std::nth_element's comparisons of random values are mispredicted branches.
template <typename K>
FASTSSL_ROW_KERNEL K rth_largest_key(const K* keys, int64_t m, int64_t r) {
  K t = 0;
  for (int bit = 8 * sizeof(K) - 1; bit >= 0; --bit) {
    const K c = t | (K(1) << bit);
    int64_t count = 0;
#pragma omp simd reduction(+ : count)
    for (int64_t i = 0; i < m; ++i) count += keys[i] >= c;
    if (count >= r) t = c;
  }
  return t;
}

// (b) of the selection: writes the columns i with !(v[i] < t) (v[i] >= t, or NaN) to keep, returns
// their count; keep has room for k + 16. With scale, v[i] <- v[i] scale[i] first, in the same pass.
// Without a branch per column; for fp32 on CPUs with AVX-512, 16 columns per comparison, the passing
// ones compressed in a register and stored whole (a compressing store to memory is microcoded on
// some CPUs).
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx512f"))) int64_t keep_at_or_above_avx512(float* v, int64_t k, float t, int64_t* keep,
                                                                   const float* scale) {
  const __m512 threshold = _mm512_set1_ps(t);
  __m512i lo = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), hi = _mm512_add_epi64(lo, _mm512_set1_epi64(8));
  const __m512i step = _mm512_set1_epi64(16);
  int64_t kept = 0, i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 x = _mm512_loadu_ps(v + i);
    if (scale) {
      x = _mm512_mul_ps(x, _mm512_loadu_ps(scale + i));
      _mm512_storeu_ps(v + i, x);
    }
    const __mmask16 m = _mm512_cmp_ps_mask(x, threshold, _CMP_NLT_UQ);
    _mm512_storeu_si512(keep + kept, _mm512_maskz_compress_epi64(__mmask8(m), lo));
    kept += __builtin_popcount(m & 0xFF);
    _mm512_storeu_si512(keep + kept, _mm512_maskz_compress_epi64(__mmask8(m >> 8), hi));
    kept += __builtin_popcount(m >> 8);
    lo = _mm512_add_epi64(lo, step), hi = _mm512_add_epi64(hi, step);
  }
  for (; i < k; ++i) {
    if (scale) v[i] *= scale[i];
    keep[kept] = i;
    kept += !(v[i] < t);
  }
  return kept;
}
#endif

template <typename T>
int64_t keep_at_or_above(T* v, int64_t k, T t, int64_t* keep, const T* scale) {
#if defined(__GNUC__) && defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    static const bool avx512 = __builtin_cpu_supports("avx512f");
    if (avx512) return keep_at_or_above_avx512(v, k, t, keep, scale);
  }
#endif
  int64_t kept = 0;
  for (int64_t i = 0; i < k; ++i) {
    if (scale) v[i] *= scale[i];
    keep[kept] = i;
    kept += !(v[i] < t);
  }
  return kept;
}

// s_j <- s_j scale_j: queue_scores' column scaling (the same products, so the same hard sets).
template <typename T>
FASTSSL_ROW_KERNEL void scale_columns(T* s, int64_t k, const T* scale) {
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) s[j] *= scale[j];
}

// Work memory of select_largest, one per thread.
template <typename T>
struct Selection {
  std::vector<KeyOf<T>> keys;
  std::vector<int64_t> keep;
};

// Writes the columns of the n largest entries of row v[0, k) to out[0, n) (0 < n <= k), in column
// order; of equal values at the n-th place, the lowest columns. With scale, the row is v_j scale_j:
// v is scaled in place on the way (in the pass of (b) when there is one).
template <typename T>
void select_largest(T* v, int64_t k, int64_t n, int64_t* out, Selection<T>& work, const T* scale = nullptr) {
  auto& [keys, keep] = work;
  keep.resize(k + 16);
  int64_t kept = 0;
  constexpr int64_t kSample = 4096;
  if (k > 4 * kSample && n * 8 < k) {
    // (a) threshold from a sample: expected n * m / k of it lie above the n-th largest. The sample
    // is kSample / 16 runs of 16 adjacent columns spread evenly over the row (a MoCo queue is in
    // order of age), so that it reads one cache line per run rather than one per entry
    const int64_t runs = kSample / 16, stride = k / runs, m = runs * 16;
    keys.resize(m);
    for (int64_t r = 0; r < runs; ++r) {
      for (int64_t i = 0, c = r * stride; i < 16; ++i, ++c) keys[r * 16 + i] = order_key(scale ? v[c] * scale[c] : v[c]);
    }
    const double expected = double(n) * m / k;
    const int64_t rank = std::min<int64_t>(m, int64_t(1.25 * expected + 4 * std::sqrt(expected) + 9));
    // (b) the columns at or above the sample's rank-th largest (all of them when it is NaN)
    kept = keep_at_or_above(v, k, from_key<T>(rth_largest_key(keys.data(), m, rank)), keep.data(), scale);
    scale = nullptr;  // v is scaled
  }
  if (scale) scale_columns(v, k, scale);
  if (kept < n) {
    std::iota(keep.begin(), keep.begin() + k, int64_t(0));
    kept = k;
  }
  // (c) the n-th largest key t among the kept columns; those above t, then those at t in column order
  keys.resize(kept);
  for (int64_t i = 0; i < kept; ++i) keys[i] = order_key(v[keep[i]]);
  const KeyOf<T> t = rth_largest_key(keys.data(), kept, n);
  int64_t at_t = n;
  for (int64_t i = 0; i < kept; ++i) at_t -= keys[i] > t;
  for (int64_t i = 0, w = 0; w < n; ++i) {
    if (keys[i] > t || (keys[i] == t && at_t-- > 0)) out[w++] = keep[i];
  }
}

// For one row of logits p [k]: p <- e = exp(p - m), returns (m, sum e); m = bound when the fixed
// shift is exact, else the row's max (NaN propagates through the sum).
template <typename T>
FASTSSL_ROW_KERNEL std::pair<T, T> exp_in_place(T* p, int64_t k, T bound) {
  T m = bound;
  if (!(2 * m <= T(80))) {
    m = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < k; ++j) m = p[j] > m ? p[j] : m;
    if (!std::isfinite(m)) m = 0;  // an all -inf row, or +inf: the sum then says so
  }
  // e in one pass with its sum (lane_sum's kLanes partial sums and order), kLanes columns at a time
  // through an aligned chunk, so that reading it back as one vector is forwarded from the stores
  alignas(sizeof(Lanes<T>)) T e[kLanes];
  Lanes<T> part = {};
  int64_t j0 = 0;
  for (; j0 + kLanes <= k; j0 += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) e[l] = p[j0 + l] = fastssl::exp_tile(p[j0 + l] - m);
    part += load_lanes(e);
  }
  for (int64_t j = j0; j < k; ++j) p[j] = fastssl::exp_tile(p[j] - m);
  return {m, fastssl::lanes_total(part, p + j0, k - j0)};
}

// p_j <- p_j c scale_j
template <typename T>
FASTSSL_ROW_KERNEL void scale_weights(T* p, int64_t k, T c, const T* scale) {
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) p[j] *= c * scale[j];
}

// log(e^x + e^y), -inf when both are
template <typename T>
T log_add_exp(T x, T y) {
  if (std::isnan(x) || std::isnan(y)) return x + y;
  const T hi = std::max(x, y);
  if (hi == -std::numeric_limits<T>::infinity()) return hi;
  return hi + std::log1p(std::exp(std::min(x, y) - hi));
}

// Query `row`'s S negatives: logits out[s] = q.h_s by (4) and the coefficients out_coef[2s, 2s + 1]
// of h_s relative to the rows as stored. qr: the query, widened; w, out, out_coef: the row's slices;
// buf: 2 d scratch.
template <typename scalar_t, typename acc_t>
void mix_logits_row(const Mix& mix, int64_t row, const acc_t* qr, const acc_t* w, const acc_t* scale, acc_t* out,
                    acc_t* out_coef, acc_t* buf) {
  const int64_t d = mix.d;
  mix.for_each<scalar_t>(row, [&](int64_t col, const scalar_t* a_raw, const scalar_t* n_raw, int64_t i, int64_t j) {
    const acc_t sa = i < 0 ? acc_t(1) : scale[i], sn = scale[j];  // the query is a unit row
    const Dots<acc_t> p = [&] {
      if constexpr (kDirectRows<scalar_t, acc_t>) {
        return dots<true>(qr, a_raw, sa, n_raw, sn, d);
      } else {
        return dots<true>(qr, widen(a_raw, d, buf), sa, widen(n_raw, d, buf + d), sn, d);
      }
    }();
    const acc_t c_a = w[col] * clamped_inverse_sqrt(p.aa);
    const acc_t c_n = (1 - w[col]) * clamped_inverse_sqrt(p.nn);
    const acc_t r = clamped_inverse_sqrt(c_a * c_a * p.aa + c_n * c_n * p.nn + 2 * c_a * c_n * p.an);
    out[col] = (c_a * p.qa + c_n * p.qn) * r;
    out_coef[2 * col] = c_a * r * sa;
    out_coef[2 * col + 1] = c_n * r * sn;
  });
}

// out[d] = sum_s g[s] h_s for query `row`, h_s = coef[2s] a + coef[2s + 1] n; g, coef: the row's slices.
template <typename scalar_t, typename acc_t>
void mix_grad_row(const Mix& mix, int64_t row, const acc_t* g, const acc_t* coef, acc_t* out, acc_t* buf) {
  const int64_t d = mix.d;
  std::fill(out, out + d, acc_t(0));
  mix.for_each<scalar_t>(row, [&](int64_t col, const scalar_t* a_raw, const scalar_t* n_raw, int64_t, int64_t) {
    const acc_t c = g[col];
    if constexpr (kDirectRows<scalar_t, acc_t>) {
      axpy2(out, c * coef[2 * col], a_raw, c * coef[2 * col + 1], n_raw, d);
    } else {
      axpy2(out, c * coef[2 * col], widen(a_raw, d, buf), c * coef[2 * col + 1], widen(n_raw, d, buf + d), d);
    }
  });
}

}  // namespace

namespace {

// The synthetic negatives of a chunk of the loss's rows, checked: positions first, second [R, S] in
// each row's hard set (first = -1: the query), weights [R, S], the queue [K, D] with its rows'
// power-of-two scales [K], and the query rows q_bar [R, D] in the queue's dtype (qs = q_bar / tau in
// the accumulation dtype, as the products s were made from).
struct MixRows {
  at::Tensor qs, q_bar, queue, row_scale, first, second, weight;
  int64_t s, d;

  MixRows(const at::Tensor& qs_in, const at::Tensor& q_bar_in, const at::Tensor& queue_in,
          const at::Tensor& row_scale_in, const at::Tensor& first_in, const at::Tensor& second_in,
          const at::Tensor& weight_in, int64_t r, int64_t k, int64_t n, at::ScalarType acc)
      : qs(qs_in.to(acc).contiguous()),
        q_bar(q_bar_in.contiguous()),
        queue(queue_in.contiguous()),
        row_scale(row_scale_in.to(acc).contiguous()),
        first(first_in.contiguous()),
        second(second_in.contiguous()),
        weight(weight_in.to(acc).contiguous()) {
    const char* fn = "mochi_queue_rows_cpu";
    TORCH_CHECK(queue.dim() == 2 && queue.size(0) == k && queue.device().is_cpu(), fn, ": queue must be [", k,
                ", D] on the CPU, got ", queue.sizes());
    d = queue.size(1);
    TORCH_CHECK(q_bar.sizes() == at::IntArrayRef({r, d}) && qs.sizes() == q_bar.sizes() &&
                    q_bar.scalar_type() == queue.scalar_type(),
                fn, ": qs and q_bar must be [", r, ", ", d, "], q_bar in the queue's dtype, got ", qs.sizes(), " and ",
                q_bar.sizes(), " ", q_bar.scalar_type());
    TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == k, fn, ": row_scale must be [", k, "], got ",
                row_scale.sizes());
    TORCH_CHECK(first.dim() == 2 && first.size(0) == r && second.sizes() == first.sizes() &&
                    weight.sizes() == first.sizes() && first.scalar_type() == at::kLong &&
                    second.scalar_type() == at::kLong,
                fn, ": first, second (int64) and weight must be [", r, ", S], got ", first.sizes(), ", ",
                second.sizes(), " and ", weight.sizes());
    s = first.size(1);
    TORCH_CHECK(all_in_range(first, -1, n) && all_in_range(second, 0, n), fn,
                ": positions out of range for hard sets of ", n, " rows");
  }
};

// Per synthetic negative of a row: the rows' products x.x, y.y, x.y (x = a sa, y = n sn, the rows
// times their power-of-two scales), qs.a^ and qs.n^, the weight, and the scales that take h's
// coefficients back to the rows as stored; then by (4), in place, h = coef_a a + coef_n n.
template <typename acc_t>
struct MixTerms {
  std::vector<acc_t> aa, nn, an, la, ln, sa, sn, w;

  void resize(int64_t s) {
    for (auto* v : {&aa, &nn, &an, &la, &ln, &sa, &sn, &w}) v->resize(s);
  }
};

// (4) for s negatives at once, elementwise (vectorised): mixed = qs.h = (w qs.a^ + (1 - w) qs.n^) / |v|,
// and sa <- coef_a, sn <- coef_n.
template <typename T>
FASTSSL_ROW_KERNEL void mix_terms(int64_t s, const T* w, const T* aa, const T* nn, const T* an, const T* la,
                                  const T* ln, T* sa, T* sn, T* mixed) {
#pragma omp simd
  for (int64_t c = 0; c < s; ++c) {
    const T c_a = w[c] * clamped_inverse_sqrt(aa[c]), c_n = (1 - w[c]) * clamped_inverse_sqrt(nn[c]);
    const T r = clamped_inverse_sqrt(c_a * c_a * aa[c] + c_n * c_n * nn[c] + 2 * c_a * c_n * an[c]);
    mixed[c] = (w[c] * la[c] + (1 - w[c]) * ln[c]) * r;
    sa[c] *= c_a * r;
    sn[c] *= c_n * r;
  }
}

// Row `row`'s synthetic negatives by (4), from its queue logits l_j = qs.n^_j at the hard columns
// (qs.a^ is l_a: only the rows' own products are formed, O(D), and no product with the query).
// t: their terms, mixed[s] = qs.h_s with h_s = t.sa[s] a + t.sn[s] n relative to the rows as stored,
// a = q_bar's row where first < 0. buf: 3 d scratch (the widened query row, and two fp16 rows).
template <typename scalar_t, typename acc_t>
void mix_from_logits(const MixRows& in, int64_t row, const acc_t* l, const int64_t* hard, MixTerms<acc_t>& t,
                     acc_t* mixed, acc_t* buf) {
  const int64_t d = in.d, s = in.s;
  const int64_t* fi = in.first.data_ptr<int64_t>() + row * s;
  const int64_t* si = in.second.data_ptr<int64_t>() + row * s;
  const acc_t* scale = in.row_scale.data_ptr<acc_t>();
  const scalar_t* rows = in.queue.data_ptr<scalar_t>();
  const scalar_t* self = in.q_bar.data_ptr<scalar_t>() + row * d;
  const acc_t* qr = widen(self, d, buf);  // q_bar's row: a unit row, scale 1
  const acc_t* qs = in.qs.data_ptr<acc_t>() + row * d;
  acc_t qs_self = 0;  // qs.q_bar
  for (int64_t i = 0; i < d; ++i) qs_self += qs[i] * qr[i];
  const auto rows_of = [&](const scalar_t* a, const scalar_t* n, acc_t sa, acc_t sn, auto query) {
    if constexpr (kDirectRows<scalar_t, acc_t>) {
      return dots<decltype(query)::value>(qr, a, sa, n, sn, d);
    } else {
      return dots<decltype(query)::value>(qr, widen(a, d, buf + d), sa, widen(n, d, buf + 2 * d), sn, d);
    }
  };
  std::copy(in.weight.data_ptr<acc_t>() + row * s, in.weight.data_ptr<acc_t>() + (row + 1) * s, t.w.begin());
  for (int64_t c = 0; c < s; ++c) {
    if (c + kAhead < s) {
      const int64_t a_next = fi[c + kAhead];
      prefetch_rows(a_next < 0 ? self : rows + hard[a_next] * d, rows + hard[si[c + kAhead]] * d, d);
    }
    const int64_t j = hard[si[c]], i = fi[c] < 0 ? -1 : hard[fi[c]];
    const Dots<acc_t> p = i < 0 ? rows_of(self, rows + j * d, acc_t(1), scale[j], std::true_type{})
                                : rows_of(rows + i * d, rows + j * d, scale[i], scale[j], std::false_type{});
    t.aa[c] = p.aa, t.nn[c] = p.nn, t.an[c] = p.an;
    // qs.a^: l_i for a queue row; for the query, qs.q_bar / |q_bar|
    t.la[c] = i < 0 ? qs_self * clamped_inverse_sqrt(p.aa) : l[i];
    t.ln[c] = l[j];
    t.sa[c] = i < 0 ? acc_t(1) : scale[i];
    t.sn[c] = scale[j];
  }
  mix_terms(s, t.w.data(), t.aa.data(), t.nn.data(), t.an.data(), t.la.data(), t.ln.data(), t.sa.data(), t.sn.data(),
            mixed);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mochi_queue_rows_cpu(at::Tensor s, const at::Tensor& bound_in,
                                                        const at::Tensor& scale_in, int64_t n, const at::Tensor& qs,
                                                        const at::Tensor& q_bar, const at::Tensor& queue,
                                                        const at::Tensor& row_scale, const at::Tensor& first,
                                                        const at::Tensor& second, const at::Tensor& weight) {
  TORCH_CHECK(s.dim() == 2 && s.device().is_cpu() && s.is_contiguous() && s.scalar_type() == queue.scalar_type(),
              "mochi_queue_rows_cpu: s must be a contiguous 2-D CPU tensor in the queue's dtype ", queue.scalar_type(),
              ", got ", s.sizes(), " ", s.scalar_type());
  const at::ScalarType acc = at::toOpMathType(queue.scalar_type());
  const int64_t r = s.size(0), k = s.size(1);
  const at::Tensor bound = bound_in.to(acc).contiguous();
  const at::Tensor scale = scale_in.to(acc).contiguous();
  TORCH_CHECK(bound.numel() == r && scale.numel() == k, "mochi_queue_rows_cpu: bound must be [", r, "] and scale [", k,
              "], got ", bound.sizes(), " and ", scale.sizes());
  TORCH_CHECK(n >= 0 && n <= k, "mochi_queue_rows_cpu: n must be in [0, ", k, "], got ", n);
  const MixRows mix(qs, q_bar, queue, row_scale, first, second, weight, r, k, n, acc);
  TORCH_CHECK(mix.s == 0 || n > 0, "mochi_queue_rows_cpu: synthetic negatives need a hard set (n > 0)");
  at::Tensor lse = at::empty({r}, s.options().dtype(acc));
  at::Tensor q_coef = at::zeros({r}, lse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, queue.scalar_type(), "mochi_queue_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* sp = s.data_ptr<scalar_t>();
    const acc_t* sc = scale.data_ptr<acc_t>();
    const int64_t ns = mix.s;
    at::parallel_for(0, r, 1, [&](int64_t begin, int64_t end) {
      const fastssl::FlushDenormals flush;  // denormals: csrc/cpu/vec_math.h
      Selection<acc_t> work;
      std::vector<int64_t> hard(n);
      // a bf16/fp16 row is widened into an fp32 row (in L2) and its weights rounded back in place:
      // the product with the queue reads them in the queue's dtype, with no conversion pass
      std::vector<acc_t> mixed(ns), buf(3 * mix.d), wide(std::is_same_v<scalar_t, acc_t> ? 0 : k);
      MixTerms<acc_t> terms;
      terms.resize(ns);
      for (int64_t row = begin; row < end; ++row) {  // every step while the row is in cache
        acc_t* p = const_cast<acc_t*>(widen(sp + row * k, k, wide.data()));  // the row itself for acc_t
        const acc_t bound_r = bound.data_ptr<acc_t>()[row];  // also bounds qs.h (h a unit vector)
        if (n > 0) {
          select_largest(p, k, n, hard.data(), work, sc);
        } else {
          scale_columns(p, k, sc);
        }
        // the synthetic negatives' logits (reading p, the logits, at the hard columns), then
        // mixed <- exp(mixed - m_mix)
        acc_t lse_mix = -std::numeric_limits<acc_t>::infinity(), total_mix = 1;
        if (ns > 0) {
          mix_from_logits<scalar_t>(mix, row, p, hard.data(), terms, mixed.data(), buf.data());
          const auto [m, total] = exp_in_place(mixed.data(), ns, bound_r);
          lse_mix = m + std::log(total), total_mix = total;
        }
        // the queue's; lse over both, and each part's share of it (the softmax over all the negatives)
        const auto [m, total] = exp_in_place(p, k, bound_r);
        const acc_t lse_queue = m + std::log(total), all = log_add_exp(lse_queue, lse_mix);
        lse.data_ptr<acc_t>()[row] = all;
        scale_weights(p, k, std::exp(lse_queue - all) / total, sc);
        // then the synthetic negatives' weights onto the rows they mix: the product with the queue
        // that follows gives the direction of both (the query's share in q_coef)
        if (ns > 0) {
          const acc_t share = std::exp(lse_mix - all) / total_mix;
          const int64_t* fi = mix.first.data_ptr<int64_t>() + row * ns;
          const int64_t* si = mix.second.data_ptr<int64_t>() + row * ns;
          acc_t self = 0;
          for (int64_t c = 0; c < ns; ++c) {
            const acc_t g = share * mixed[c];
            (fi[c] < 0 ? self : p[hard[fi[c]]]) += g * terms.sa[c];
            p[hard[si[c]]] += g * terms.sn[c];
          }
          q_coef.data_ptr<acc_t>()[row] = self;
        }
        narrow(p, k, sp + row * k);
      }
    });
  });
  return {lse, q_coef};
}

at::Tensor mochi_hard_set_cpu(const at::Tensor& scores_in, int64_t n) {
  TORCH_CHECK(scores_in.dim() == 2 && scores_in.device().is_cpu(),
              "mochi_hard_set_cpu: scores must be a 2-D CPU tensor, got ", scores_in.sizes());
  const at::Tensor scores = scores_in.contiguous();
  const int64_t b = scores.size(0), k = scores.size(1);
  TORCH_CHECK(n >= 0 && n <= k, "mochi_hard_set_cpu: n must be in [0, ", k, "], got ", n);
  at::Tensor out = at::empty({b, n}, scores.options().dtype(at::kLong));
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mochi_hard_set_cpu", [&] {
    scalar_t* v = scores.data_ptr<scalar_t>();  // read only: select_largest writes v only to scale it
    int64_t* idx = out.data_ptr<int64_t>();
    at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
      const fastssl::FlushDenormals flush;  // denormals: csrc/cpu/vec_math.h
      Selection<scalar_t> work;
      for (int64_t row = begin; row < end; ++row) {
        select_largest(v + row * k, k, n, idx + row * n, work);
      }
    });
  });
  return out;
}

namespace {

// The checked weight and row scales of a forward, in the accumulation dtype of q.
struct MixForward {
  at::Tensor q, weight, row_scale;
  at::ScalarType acc;

  MixForward(const Mix& mix, const at::Tensor& q_in, const at::Tensor& weight_in, const at::Tensor& row_scale_in,
             const char* fn)
      : q(q_in.contiguous()), acc(q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat) {
    TORCH_CHECK(q_in.sizes() == mix.q_bar.sizes() && q_in.scalar_type() == mix.q_bar.scalar_type(), fn,
                ": q and q_bar must match, got ", q_in.sizes(), " and ", mix.q_bar.sizes());
    TORCH_CHECK(weight_in.sizes() == mix.first.sizes(), fn, ": weight must be [B, S] like first, got ",
                weight_in.sizes());
    TORCH_CHECK(row_scale_in.dim() == 1 && row_scale_in.size(0) == mix.k, fn, ": row_scale must be [K] with K = ",
                mix.k, ", got ", row_scale_in.sizes());
    weight = weight_in.to(acc).contiguous();
    row_scale = row_scale_in.to(acc).contiguous();
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> mochi_mix_fwd_cpu(const at::Tensor& q_in, const at::Tensor& q_bar,
                                                     const at::Tensor& queue, const at::Tensor& first,
                                                     const at::Tensor& second, const at::Tensor& weight_in,
                                                     const at::Tensor& row_scale_in) {
  const Mix mix(q_bar, queue, first, second, "mochi_mix_fwd_cpu");
  const MixForward in(mix, q_in, weight_in, row_scale_in, "mochi_mix_fwd_cpu");
  at::Tensor logits = at::empty({mix.b, mix.s}, in.q.options().dtype(in.acc));
  at::Tensor coef = at::empty({mix.b, mix.s, 2}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.q.scalar_type(), "mochi_mix_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t d = mix.d, s = mix.s;
    at::parallel_for(0, mix.b, 1, [&](int64_t begin, int64_t end) {
      const fastssl::FlushDenormals flush;  // denormals: csrc/cpu/vec_math.h
      std::vector<acc_t> buf(3 * d);
      for (int64_t row = begin; row < end; ++row) {
        const acc_t* qr = widen(in.q.data_ptr<scalar_t>() + row * d, d, buf.data());
        mix_logits_row<scalar_t>(mix, row, qr, in.weight.data_ptr<acc_t>() + row * s, in.row_scale.data_ptr<acc_t>(),
                                 logits.data_ptr<acc_t>() + row * s, coef.data_ptr<acc_t>() + 2 * row * s,
                                 buf.data() + d);
      }
    });
  });
  return {logits, coef};
}

at::Tensor mochi_mix_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& q_bar, const at::Tensor& queue,
                             const at::Tensor& first, const at::Tensor& second, const at::Tensor& coef_in) {
  const Mix mix(q_bar, queue, first, second, "mochi_mix_bwd_cpu");
  const auto acc_type = mix.q_bar.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad = grad_in.to(acc_type).contiguous();
  const at::Tensor coef = coef_in.to(acc_type).contiguous();
  TORCH_CHECK(grad.sizes() == mix.first.sizes(), "mochi_mix_bwd_cpu: grad must be [B, S] like first, got ",
              grad.sizes());
  TORCH_CHECK(coef.dim() == 3 && coef.size(0) == mix.b && coef.size(1) == mix.s && coef.size(2) == 2,
              "mochi_mix_bwd_cpu: coef must be [B, S, 2], got ", coef.sizes());
  at::Tensor grad_q = at::empty({mix.b, mix.d}, mix.q_bar.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mix.q_bar.scalar_type(), "mochi_mix_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t d = mix.d, s = mix.s;
    at::parallel_for(0, mix.b, 1, [&](int64_t begin, int64_t end) {
      const fastssl::FlushDenormals flush;  // denormals: csrc/cpu/vec_math.h
      std::vector<acc_t> buf(2 * d);
      for (int64_t row = begin; row < end; ++row) {
        mix_grad_row<scalar_t>(mix, row, grad.data_ptr<acc_t>() + row * s, coef.data_ptr<acc_t>() + 2 * row * s,
                               grad_q.data_ptr<acc_t>() + row * d, buf.data());
      }
    });
  });
  return grad_q.to(mix.q_bar.scalar_type());
}
