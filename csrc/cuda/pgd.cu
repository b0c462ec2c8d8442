// PGD on CUDA: one fused projected-gradient step, in place. Same contract and math as the CPU
// kernel (csrc/cpu/pgd.cpp), whose comments number the equations used here:
//
//   L-inf:  x <- clamp(x0 + clamp(x + alpha sign(g) - x0, -eps, eps), lo, hi)                (1)
//   L2:     x <- clamp(x0 + f (x + c g - x0), lo, hi),  c = alpha / (||g|| + 1e-10),          (2)
//           f = min(1, eps / ||delta||),  ||delta||^2 = ||d||^2 + 2 c d.g + c^2 ||g||^2.        (3)
//
// Layout: x, x0, g are [B, n]; a thread block takes a tile of kTile elements of one sample
// (grid = B * tiles). (1) is one kernel, one pass: 3 reads and 1 write per element. For (2) a
// first kernel writes each tile's three sums of (3) to partials [B, tiles, 3]; the step kernel
// reduces its sample's partials (every block of a sample sums them in the same order, so all see
// the same f) and then writes the tile: two passes, no atomics, deterministic.
//
// Not yet the default GPU path: fastssl dispatches CUDA tensors to the Triton kernel until a GPU
// run has shown this one correct and faster (docs/design.md, "Dispatch"). As every .cu file here, it
// includes only ATen headers and the CUDA runtime (a CPU torch ships no c10/cuda headers, and
// `make cuda-check` compiles against those) and takes torch's current stream from Python.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <cuda_runtime.h>

#include "../ops.h"

namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // elements per thread per tile: enough loads in flight per thread
constexpr int64_t kTile = int64_t(kThreads) * kItems;

template <class A>
__device__ __forceinline__ A clamp_nan(A v, A lo, A hi) {
  // NaN propagates as in torch.clamp (fminf/fmaxf would drop it)
  return v != v ? v : (v < lo ? lo : (v > hi ? hi : v));
}

template <class A>
__device__ __forceinline__ A sign_nan(A g) {
  return g > A(0) ? A(1) : (g < A(0) ? A(-1) : g);  // NaN stays NaN, +-0 stays +-0
}

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block; the result is valid in every thread. `shared` holds 3 * 32 values.
template <class A>
__device__ void block_sum3(A& a, A& b, A& c, A* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  if (lane == 0) {
    shared[warp] = a;
    shared[32 + warp] = b;
    shared[64 + warp] = c;
  }
  __syncthreads();
  a = b = c = A(0);
  for (int w = 0; w < warps; ++w) {  // same order in every thread: the same bits everywhere
    a += shared[w];
    b += shared[32 + w];
    c += shared[64 + w];
  }
  __syncthreads();
}

// Partial sums of (3) over one tile: partials[(b * tiles + t) * 3 + {0, 1, 2}] = ||d||^2, d.g, ||g||^2.
template <class T>
__global__ void pgd_l2_sums_kernel(const T* __restrict__ x, const T* __restrict__ x0,
                                   const T* __restrict__ g, double* __restrict__ partials,
                                   int64_t n, int64_t tiles) {
  using A = at::opmath_type<T>;
  // the sums in double, products included: in fp32, g^2 overflows for |g| > 1.8e19
  __shared__ double shared[96];
  const int64_t item = blockIdx.x, b = item / tiles, start = (item % tiles) * kTile;
  const int64_t base = b * n;
  double dd = 0, dg = 0, gg = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = start + k * kThreads + threadIdx.x;
    if (i < n) {
      const double d = double(A(x[base + i]) - A(x0[base + i])), gi = double(g[base + i]);
      dd += d * d;
      dg += d * gi;
      gg += gi * gi;
    }
  }
  block_sum3(dd, dg, gg, shared);
  if (threadIdx.x == 0) {
    partials[item * 3 + 0] = dd;
    partials[item * 3 + 1] = dg;
    partials[item * 3 + 2] = gg;
  }
}

template <class T, bool L2>
__global__ void pgd_step_kernel(T* __restrict__ x, const T* __restrict__ x0, const T* __restrict__ g,
                                const at::opmath_type<T>* __restrict__ eps,
                                const at::opmath_type<T>* __restrict__ alpha,
                                const double* __restrict__ partials, int64_t n, int64_t tiles,
                                at::opmath_type<T> lo, at::opmath_type<T> hi) {
  using A = at::opmath_type<T>;
  const int64_t item = blockIdx.x, b = item / tiles, start = (item % tiles) * kTile;
  const int64_t base = b * n;
  const A e = eps[b];
  A a = alpha[b], f = A(1);
  if (L2) {
    __shared__ double shared[96];
    double dd = 0, dg = 0, gg = 0;
    for (int64_t t = threadIdx.x; t < tiles; t += blockDim.x) {
      const double* p = partials + (b * tiles + t) * 3;
      dd += p[0];
      dg += p[1];
      gg += p[2];
    }
    block_sum3(dd, dg, gg, shared);
    a = a / (A(sqrt(gg)) + A(1e-10));  // c of (2); the norms rounded to A, as the CPU kernel does
    const double c = double(a);
    const A norm = A(sqrt(max(0.0, dd + 2.0 * c * dg + c * c * gg)));
    f = norm > e ? e / norm : A(1);
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = start + k * kThreads + threadIdx.x;
    if (i < n) {
      const A xi = A(x[base + i]), x0i = A(x0[base + i]), gi = A(g[base + i]);
      const A delta = L2 ? (xi + a * gi - x0i) * f : clamp_nan(xi + a * sign_nan(gi) - x0i, -e, e);
      x[base + i] = T(clamp_nan(x0i + delta, lo, hi));
    }
  }
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "pgd_step_cuda: kernel launch failed: ", cudaGetErrorString(err));
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& x_adv) {
  TORCH_CHECK(t.device() == x_adv.device(), "pgd_step_cuda: ", name, " is on ", t.device(),
              " but x_adv is on ", x_adv.device());
  TORCH_CHECK(t.sizes() == x_adv.sizes(), "pgd_step_cuda: ", name, " has shape ", t.sizes(),
              " but x_adv has ", x_adv.sizes());
  TORCH_CHECK(t.scalar_type() == x_adv.scalar_type(), "pgd_step_cuda: ", name, " has dtype ",
              t.scalar_type(), " but x_adv has ", x_adv.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "pgd_step_cuda: ", name, " must be contiguous");
}

}  // namespace

void pgd_step_cuda(at::Tensor x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                   const at::Tensor& eps, const at::Tensor& alpha, bool l2, double lo, double hi,
                   int64_t stream_handle) {
  TORCH_CHECK(x_adv.is_cuda(), "pgd_step_cuda: x_adv must be a CUDA tensor");
  TORCH_CHECK(x_adv.dim() >= 1, "pgd_step_cuda: x_adv must be [B, ...], got a scalar");
  check_like(x_adv, "x_adv", x_adv);
  check_like(grad, "grad", x_adv);
  check_like(x_orig, "x_orig", x_adv);
  const int64_t batch = x_adv.size(0);
  if (batch == 0 || x_adv.numel() == 0) return;
  TORCH_CHECK(eps.sizes() == at::IntArrayRef{batch} && alpha.sizes() == at::IntArrayRef{batch},
              "pgd_step_cuda: eps and alpha must be [B] = [", batch, "], got ", eps.sizes(), " and ",
              alpha.sizes());
  const at::DeviceGuard guard(x_adv.device());
  const int64_t n = x_adv.numel() / batch;
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t blocks = batch * tiles;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "pgd_step_cuda: too many tiles (", blocks, ")");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const at::Tensor eps_a = eps.to(x_adv.device(), acc).contiguous();
    const at::Tensor alpha_a = alpha.to(x_adv.device(), acc).contiguous();
    scalar_t* x = x_adv.data_ptr<scalar_t>();
    const scalar_t* x0 = x_orig.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    if (l2) {
      at::Tensor partials = at::empty({blocks * 3}, x_adv.options().dtype(at::kDouble));
      pgd_l2_sums_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x, x0, g, partials.data_ptr<double>(), n, tiles);
      check_launch();
      pgd_step_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          x, x0, g, eps_a.data_ptr<A>(), alpha_a.data_ptr<A>(), partials.data_ptr<double>(), n, tiles, A(lo),
          A(hi));
    } else {
      pgd_step_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          x, x0, g, eps_a.data_ptr<A>(), alpha_a.data_ptr<A>(), nullptr, n, tiles, A(lo), A(hi));
    }
    check_launch();
  });
}
