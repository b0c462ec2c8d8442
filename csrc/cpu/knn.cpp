// Exact k-nearest-neighbour search by inner product on the CPU: bf16 candidates, an exact rerank
// (docs/design.md, "kNN and k-means"; fastssl/neighbors.py's impl="cpp").
//
// For unit fp32 rows q (queries) and x_j (train rows), s_j = q.x_j. The tiles S = Q X^T are
// multiplied in bf16 with fp32 accumulation (AVX512-BF16 / AMX through oneDNN, 2.5-4x the fp32 GEMM
// here) and rounded to bf16, so each approximate score t_j differs from s_j by at most
//   delta = 3u + u^2 + D * 2^-23,   u = 2^-8:                                                     (1)
// u per factor for rounding q and x_j (|e.x| <= u ||q|| ||x||, unit rows), u for rounding the output
// and the fp32 accumulation over D terms. If theta is the k-th largest t, then theta <= s_(k) + delta
// (s_(k) the k-th largest exact score: at most k - 1 scores exceed it), and every one of the k
// nearest rows has t_j >= s_j - delta >= s_(k) - delta >= theta - 2 delta. A row with
// t_j < theta' - 2 delta, theta' the k-th largest t among the rows seen so far (theta' <= theta), is
// therefore not among the k nearest: each query keeps only the candidates at or above that running
// threshold, then computes their s_j exactly in fp32 and returns the k largest. The result is the
// exact search's (up to fp32 rounding of tied scores), whatever the bf16 backend's summation order.
//
// Work: query blocks of kQueryBlock rows are the threads' unit; each multiplies its block with train
// blocks of kTrainBlock rows (one single-threaded GEMM into a [kQueryBlock, kTrainBlock] bf16 tile
// that stays in L2) and scans the tile row by row, 32 scores per AVX-512 test against the query's
// threshold (a portable vector loop elsewhere), visiting only the scores above it. A query's
// candidate list is pruned (nth_element to the k-th, then the 2 delta window) when it fills; a query
// whose window holds more than kMaxCandidates rows (many near-ties, e.g. duplicate rows) stops
// collecting and is searched exactly in fp32 at the end, as are all queries when k itself is too
// large for the lists (2k + 64 > kMaxCandidates).
//
// oneDNN's bf16 micro-kernels (ATen's cpublas::brgemm, fp32 tiles: no output rounding, half the
// window) were tried in place of the GEMM: 1.50 s against 1.64 s single-threaded at N = 50000,
// Q = 10000, D = 128, k = 200, equal at k = 20 and at D = 768, for a packing step and a second
// backend; not taken.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../ops.h"
#include "vec_math.h"

namespace {

constexpr int64_t kQueryBlock = 512;
constexpr int64_t kTrainBlock = 1024;
constexpr int64_t kMaxCandidates = 1 << 14;
constexpr int64_t kLanes = 16;

typedef float F16 __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t U16 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t H16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));

inline float bf16_value(uint16_t bits) {
  const uint32_t w = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

// kLanes bf16 values as fp32 (bf16 is the top half of an fp32)
inline F16 load_bf16(const uint16_t* p) {
  H16 h;
  std::memcpy(&h, p, sizeof h);
  const U16 w = __builtin_convertvector(h, U16) << 16;
  F16 f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

inline F16 vmax(F16 a, F16 b) { return a > b ? a : b; }

// the largest lane, in four halving steps
inline float hmax(F16 a) {
  a = vmax(a, __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  a = vmax(a, __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  a = vmax(a, __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  a = vmax(a, __builtin_shufflevector(a, a, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return a[0];
}

struct Candidate {
  float score;
  int32_t index;
};

struct Candidates {
  std::vector<Candidate> items;
  float threshold = -std::numeric_limits<float>::infinity();
  int64_t capacity = 0;
  bool overflow = false;

  // Keeps the entries at or above theta - 2 delta, theta the k-th largest score held.
  void prune(int64_t k, float window) {
    if (static_cast<int64_t>(items.size()) <= k) return;
    const auto kth = items.begin() + (k - 1);
    std::nth_element(items.begin(), kth, items.end(), [](Candidate a, Candidate b) { return a.score > b.score; });
    threshold = std::max(threshold, kth->score - window);
    // the first k are at or above theta; the rest go unless within the window
    items.erase(std::remove_if(kth + 1, items.end(), [&](Candidate c) { return c.score < threshold; }), items.end());
  }
};

constexpr int64_t kChunk = 4 * kLanes;  // scores compared per test against the threshold

// Appends the scores of one tile row (n values of train rows j0 ...) at or above the threshold.
// Portable: one test per kChunk scores (their maximum), then one per kLanes, and a scalar loop only
// over a vector that holds a candidate.
void scan_row_portable(const uint16_t* row, int64_t n, int32_t j0, Candidates& c) {
  const float tau = c.threshold;
  auto push = [&](int64_t l) {
    const float f = bf16_value(row[l]);
    if (f >= tau) c.items.push_back({f, j0 + static_cast<int32_t>(l)});
  };
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    F16 v[kChunk / kLanes];
    for (int64_t i = 0; i < kChunk / kLanes; ++i) v[i] = load_bf16(row + j + i * kLanes);
    if (hmax(vmax(vmax(v[0], v[1]), vmax(v[2], v[3]))) < tau) continue;
    for (int64_t i = 0; i < kChunk / kLanes; ++i)
      if (hmax(v[i]) >= tau)
        for (int64_t l = j + i * kLanes; l < j + (i + 1) * kLanes; ++l) push(l);
  }
  for (; j < n; ++j) push(j);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTSSL_HAVE_AVX512_SCAN 1
#define FASTSSL_AVX512 __attribute__((target("avx512f,avx512bw")))
FASTSSL_AVX512 inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// AVX-512: 32 scores per test (two compares into bit masks), then the candidates' bits one by one.
FASTSSL_AVX512 void scan_row_avx512(const uint16_t* row, int64_t n, int32_t j0, Candidates& c) {
  const __m512 tau = _mm512_set1_ps(c.threshold);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    const __m512 a = load16(row + j), b = load16(row + j + kLanes);
    uint32_t bits = _mm512_cmp_ps_mask(a, tau, _CMP_GE_OQ) | (uint32_t(_mm512_cmp_ps_mask(b, tau, _CMP_GE_OQ)) << 16);
    while (bits != 0) {
      const int l = __builtin_ctz(bits);
      bits &= bits - 1;
      c.items.push_back({bf16_value(row[j + l]), j0 + static_cast<int32_t>(j + l)});
    }
  }
  if (j < n) scan_row_portable(row + j, n - j, j0 + static_cast<int32_t>(j), c);
}
#endif

void scan_row(const uint16_t* row, int64_t n, int32_t j0, Candidates& c) {
#ifdef FASTSSL_HAVE_AVX512_SCAN
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (avx512) return scan_row_avx512(row, n, j0, c);
#endif
  scan_row_portable(row, n, j0, c);
}

// q.x in fp32, kLanes partial sums.
FASTSSL_ROW_KERNEL float dot(const float* q, const float* x, int64_t d) {
  F16 acc{};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    F16 a, b;
    std::memcpy(&a, q + i, sizeof a);
    std::memcpy(&b, x + i, sizeof b);
    acc += a * b;
  }
  float s = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < d; ++i) s += q[i] * x[i];
  return s;
}

// Replaces the candidates' scores by exact fp32 ones, for the queries q_r (rows r of q, stride d) of
// a block. Each query's candidates are scattered over the train rows, so the (train row, query)
// pairs of the whole block are visited in train-row order (a counting sort): the train rows are
// read once, in order, and the block's queries stay in cache.
void exact_scores(const float* q, const float* x, int64_t n, int64_t d, std::vector<Candidates>& cand,
                  int64_t rows) {
  std::vector<int32_t> start(n + 1, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (const Candidate& c : cand[r].items) ++start[c.index + 1];
  for (int64_t j = 0; j < n; ++j) start[j + 1] += start[j];
  std::vector<Candidate*> pairs(start[n]);
  std::vector<int32_t> query(start[n]);
  for (int64_t r = 0; r < rows; ++r)
    for (Candidate& c : cand[r].items) {
      const int32_t at = start[c.index]++;
      pairs[at] = &c;
      query[at] = static_cast<int32_t>(r);
    }
  for (size_t i = 0; i < pairs.size(); ++i)
    pairs[i]->score = dot(q + int64_t(query[i]) * d, x + int64_t(pairs[i]->index) * d, d);
}

// The k largest (exact) scores, best first (ties: lower index first).
void top_k(Candidates& c, int64_t k, float* out_s, int64_t* out_i) {
  auto better = [](Candidate a, Candidate b) { return a.score > b.score || (a.score == b.score && a.index < b.index); };
  std::nth_element(c.items.begin(), c.items.begin() + (k - 1), c.items.end(), better);
  std::sort(c.items.begin(), c.items.begin() + k, better);
  for (int64_t i = 0; i < k; ++i) {
    out_s[i] = c.items[i].score;
    out_i[i] = c.items[i].index;
  }
}

}  // namespace

bool knn_bf16_dots_supported() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor> knn_search_cpu(const at::Tensor& query, const at::Tensor& train, int64_t k) {
  const char* fn = "knn_search_cpu";
  for (const at::Tensor* t : {&query, &train})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2, fn,
                ": query and train must be contiguous 2-D fp32 CPU tensors");
  TORCH_CHECK(query.size(1) == train.size(1), fn, ": query and train must have the same number of columns");
  const int64_t nq = query.size(0), n = train.size(0), d = train.size(1);
  TORCH_CHECK(k >= 1 && k <= n, fn, ": k must be in [1, ", n, "], got ", k);
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), fn, ": at most 2^31 - 1 train rows");
  at::Tensor sims = at::empty({nq, k}, query.options());
  at::Tensor idx = at::empty({nq, k}, query.options().dtype(at::kLong));
  if (nq == 0) return {sims, idx};
  const float window = 2.0f * static_cast<float>(3.0 / 256 + 1.0 / 65536 + static_cast<double>(d) / (1 << 23));
  const at::Tensor qb = query.to(at::kBFloat16), xb = train.to(at::kBFloat16);
  const float *qp = query.data_ptr<float>(), *xp = train.data_ptr<float>();
  float* sp = sims.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t capacity = 2 * k + 64;  // grows while a prune keeps more than half
  const int64_t blocks = (nq + kQueryBlock - 1) / kQueryBlock;
  // k near kMaxCandidates or above: every list would overflow, so all queries go the fp32 way
  const bool exact_only = capacity > kMaxCandidates;
  std::vector<uint8_t> overflow(nq, exact_only ? 1 : 0);
  if (!exact_only) at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor tile = at::empty({kQueryBlock, kTrainBlock}, qb.options());
    std::vector<Candidates> cand(kQueryBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kQueryBlock, rows = std::min(kQueryBlock, nq - r0);
      for (int64_t r = 0; r < rows; ++r) {
        cand[r] = Candidates{};
        cand[r].capacity = capacity;
        cand[r].items.reserve(std::min<int64_t>(capacity, 4096) + kTrainBlock);
      }
      for (int64_t j0 = 0; j0 < n; j0 += kTrainBlock) {
        const int64_t cols = std::min(kTrainBlock, n - j0);
        at::Tensor t = tile.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(t, qb.narrow(0, r0, rows), xb.narrow(0, j0, cols).t());
        const uint16_t* tp = reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
        for (int64_t r = 0; r < rows; ++r) {
          Candidates& c = cand[r];
          if (c.overflow) continue;
          scan_row(tp + r * kTrainBlock, cols, static_cast<int32_t>(j0), c);
          // prune when full, and after the first block (a threshold early)
          if (static_cast<int64_t>(c.items.size()) < c.capacity && j0 > 0) continue;
          c.prune(k, window);
          if (static_cast<int64_t>(c.items.size()) * 2 > c.capacity) c.capacity *= 2;
          if (c.capacity > kMaxCandidates) {
            c.overflow = true;
            overflow[r0 + r] = 1;
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        if (cand[r].overflow)
          cand[r].items.clear();
        else
          cand[r].prune(k, window);
      }
      exact_scores(qp + r0 * d, xp, n, d, cand, rows);
      for (int64_t r = 0; r < rows; ++r)
        if (!cand[r].overflow) top_k(cand[r], k, sp + (r0 + r) * k, ip + (r0 + r) * k);
    }
  });
  std::vector<int64_t> rest;
  for (int64_t r = 0; r < nq; ++r)
    if (overflow[r]) rest.push_back(r);
  // the queries with too many near-ties: exact fp32 scores, kQueryBlock queries at a time
  for (size_t r0 = 0; r0 < rest.size(); r0 += kQueryBlock) {
    const std::vector<int64_t> part(rest.begin() + r0, rest.begin() + std::min(rest.size(), r0 + kQueryBlock));
    const at::Tensor rows = at::tensor(part, idx.options());
    auto [s, i] = at::topk(at::mm(query.index_select(0, rows), train.t()), k, 1);
    sims.index_copy_(0, rows, s);
    idx.index_copy_(0, rows, i);
  }
  return {sims, idx};
}
