// CUDA kernels of the subspace ops (docs/DESIGN.md, "The subspace op contract"); preconditions in subspace.h.
//
// Everything is computed in at::opmath_type (fp32 for fp16/bf16/fp32, fp64 for fp64); a/c and the basis tensors
// arrive in that type. Loads are converted at once, stores convert back.
//
// separable: one block per (b, c) channel image. CH [h, H], CW [w, W] and the image live in shared memory;
//   analysis T = CH X, Y = T CW^T; weights s[b, band] - s[b, K-1]; synthesis S = Z CW, out = CH^T S + s_{K-1} x
//   (+ base), written once. CW rows use an odd pitch so both its row and its column walks are bank-conflict free.
// low-rank: one block per (sample, row); x tiles through shared memory while each warp owns rows of V[ids[b]]
//   (coalesced along d), the coefficients stay in shared memory for the synthesis pass over d.
// block_combine (op 3): the same blocks, x and v analysed once; the coefficients are mixed by the relative 2x2
//   blocks B_k - B_{K-1} (separable: a second [h, w] buffer; low-rank: in place in zu/zv) and each output is
//   synthesised and written once (low-rank: both outputs in one pass over V[ids[b]]).
// dot: per (b, c) or (b, row) block sums into a [B, R, K] workspace, then one thread per sample sums over R in
//   order: deterministic, no atomics. The complement is <u, v> - sum_{k<K-1} <P_k u, v>.
#include "../subspace.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "block_utils.cuh"

namespace {

using aniso_fast_cuda::block_sum;
using aniso_fast_cuda::kWarp;
using aniso_fast_cuda::prepare_dynamic_smem;
using aniso_fast_cuda::warp_sum;

constexpr int kThreads = 256;
constexpr int kScratch = 32;      // block_sum scratch at the front of dynamic shared memory
constexpr int kTileD = 1024;      // low-rank: elements of x staged per tile

template <typename acc_t>
__device__ __forceinline__ acc_t* shared_buffer() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<acc_t*>(smem_raw);
}

template <typename T>
const T* optional_ptr(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------- separable (DCT)

struct SeparableDims {
  int C, H, W, h, w, K;
  __host__ __device__ int pitch() const { return W | 1; }  // odd row pitch of CW in shared memory
};

template <typename acc_t>
struct SeparableSmem {
  acc_t* scratch;  // kScratch
  acc_t* ch;       // [h, H]
  acc_t* cw;       // [w, pitch]
  acc_t* x;        // [H, W] the image being analysed
  acc_t* t;        // [h, W] CH X, later the half synthesis Z CW
  acc_t* z;        // [h, w] coefficients

  __host__ __device__ static size_t elements(const SeparableDims& s) {
    return kScratch + size_t(s.h) * s.H + size_t(s.w) * s.pitch() + size_t(s.H) * s.W + size_t(s.h) * s.W +
           size_t(s.h) * s.w;
  }
  __device__ explicit SeparableSmem(const SeparableDims& s) {
    scratch = shared_buffer<acc_t>();
    ch = scratch + kScratch;
    cw = ch + s.h * s.H;
    x = cw + s.w * s.pitch();
    t = x + s.H * s.W;
    z = t + s.h * s.W;
  }
};

template <typename acc_t>
__device__ void load_separable_basis(const SeparableSmem<acc_t>& sm, const SeparableDims& s,
                                     const acc_t* __restrict__ CH, const acc_t* __restrict__ CW) {
  for (int i = threadIdx.x; i < s.h * s.H; i += blockDim.x) sm.ch[i] = CH[i];
  for (int i = threadIdx.x; i < s.w * s.W; i += blockDim.x) sm.cw[(i / s.W) * s.pitch() + i % s.W] = CW[i];
}

template <typename scalar_t, typename acc_t>
__device__ void load_image(acc_t* __restrict__ dst, const scalar_t* __restrict__ src, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = static_cast<acc_t>(src[i]);
}

// sm.t = CH @ sm.x, then returns nothing: the caller reads Y[i, j] = coefficient(i, j) after a barrier.
template <typename acc_t>
__device__ void left_analysis(const SeparableSmem<acc_t>& sm, const SeparableDims& s) {
  for (int idx = threadIdx.x; idx < s.h * s.W; idx += blockDim.x) {
    const int i = idx / s.W, col = idx % s.W;
    const acc_t* chi = sm.ch + i * s.H;
    acc_t acc = 0;
    for (int k = 0; k < s.H; ++k) acc += chi[k] * sm.x[k * s.W + col];
    sm.t[idx] = acc;
  }
}

// Y[i, j] = sum_x T[i, x] CW[j, x]
template <typename acc_t>
__device__ __forceinline__ acc_t coefficient(const SeparableSmem<acc_t>& sm, const SeparableDims& s, int i, int j) {
  const acc_t* ti = sm.t + i * s.W;
  const acc_t* cwj = sm.cw + j * s.pitch();
  acc_t acc = 0;
  for (int k = 0; k < s.W; ++k) acc += ti[k] * cwj[k];
  return acc;
}

// sm.z (+)= weight(b, band) * Y(image); weights s[b, band] - s[b, K-1], zero for the complement's label.
template <typename scalar_t, typename acc_t>
__device__ void accumulate_weighted_coefficients(const SeparableSmem<acc_t>& sm, const SeparableDims& s,
                                                 const scalar_t* __restrict__ img, const acc_t* __restrict__ sb,
                                                 const int64_t* __restrict__ band, bool first) {
  __syncthreads();  // sm.x / sm.t free
  load_image(sm.x, img, s.H * s.W);
  __syncthreads();
  left_analysis(sm, s);
  __syncthreads();
  const acc_t last = sb[s.K - 1];
  for (int idx = threadIdx.x; idx < s.h * s.w; idx += blockDim.x) {
    const acc_t wgt = sb[band[idx]] - last;
    const acc_t y = coefficient(sm, s, idx / s.w, idx % s.w);
    sm.z[idx] = first ? wgt * y : sm.z[idx] + wgt * y;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) separable_combine_kernel(
    const scalar_t* __restrict__ u, const scalar_t* __restrict__ v, const scalar_t* __restrict__ base,
    scalar_t* __restrict__ out, const acc_t* __restrict__ a, const acc_t* __restrict__ c,
    const acc_t* __restrict__ CH, const acc_t* __restrict__ CW, const int64_t* __restrict__ band, SeparableDims s) {
  const SeparableSmem<acc_t> sm(s);
  const int64_t img = blockIdx.x;
  const int64_t b = img / s.C;
  const int64_t offset = img * s.H * s.W;
  const acc_t* ab = a + b * s.K;
  const acc_t* cb = v ? c + b * s.K : nullptr;

  load_separable_basis(sm, s, CH, CW);
  accumulate_weighted_coefficients(sm, s, u + offset, ab, band, /*first=*/true);
  if (v) accumulate_weighted_coefficients(sm, s, v + offset, cb, band, /*first=*/false);
  __syncthreads();
  // half synthesis T = Z CW  [h, W]
  for (int idx = threadIdx.x; idx < s.h * s.W; idx += blockDim.x) {
    const int i = idx / s.W, col = idx % s.W;
    const acc_t* zi = sm.z + i * s.w;
    acc_t acc = 0;
    for (int j = 0; j < s.w; ++j) acc += zi[j] * sm.cw[j * s.pitch() + col];
    sm.t[idx] = acc;
  }
  __syncthreads();
  const acc_t a_last = ab[s.K - 1];
  const acc_t c_last = v ? cb[s.K - 1] : acc_t(0);
  for (int idx = threadIdx.x; idx < s.H * s.W; idx += blockDim.x) {
    const int row = idx / s.W, col = idx % s.W;
    acc_t acc = 0;
    for (int i = 0; i < s.h; ++i) acc += sm.ch[i * s.H + row] * sm.t[i * s.W + col];
    acc += a_last * static_cast<acc_t>(u[offset + idx]);
    if (v) acc += c_last * static_cast<acc_t>(v[offset + idx]);
    if (base) acc += static_cast<acc_t>(base[offset + idx]);
    out[offset + idx] = static_cast<scalar_t>(acc);
  }
}

// B[b, label, ij] - B[b, K-1, ij]: the relative block entry ij (0: 00, 1: 01, 2: 10, 3: 11); zero for the complement.
template <typename acc_t>
__device__ __forceinline__ acc_t block_weight(const acc_t* __restrict__ Bb, int64_t label, int K, int ij) {
  return Bb[label * 4 + ij] - Bb[(K - 1) * 4 + ij];
}

// sm.z <- Y(img) (raw coefficients, no weights).
template <typename scalar_t, typename acc_t>
__device__ void separable_coefficients(const SeparableSmem<acc_t>& sm, const SeparableDims& s,
                                       const scalar_t* __restrict__ img, acc_t* __restrict__ dst) {
  __syncthreads();  // sm.x / sm.t free
  load_image(sm.x, img, s.H * s.W);
  __syncthreads();
  left_analysis(sm, s);
  __syncthreads();
  for (int idx = threadIdx.x; idx < s.h * s.w; idx += blockDim.x) dst[idx] = coefficient(sm, s, idx / s.w, idx % s.w);
}

// out = CH^T (coef CW) + l0 x + l1 y (+ base), written once; sm.t is the half-synthesis scratch.
template <typename scalar_t, typename acc_t>
__device__ void separable_block_output(const SeparableSmem<acc_t>& sm, const SeparableDims& s,
                                       const acc_t* __restrict__ coef, acc_t l0, acc_t l1,
                                       const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                       const scalar_t* __restrict__ base, scalar_t* __restrict__ out) {
  __syncthreads();
  for (int idx = threadIdx.x; idx < s.h * s.W; idx += blockDim.x) {
    const int i = idx / s.W, col = idx % s.W;
    const acc_t* zi = coef + i * s.w;
    acc_t acc = 0;
    for (int j = 0; j < s.w; ++j) acc += zi[j] * sm.cw[j * s.pitch() + col];
    sm.t[idx] = acc;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < s.H * s.W; idx += blockDim.x) {
    const int row = idx / s.W, col = idx % s.W;
    acc_t acc = 0;
    for (int i = 0; i < s.h; ++i) acc += sm.ch[i * s.H + row] * sm.t[i * s.W + col];
    acc += l0 * static_cast<acc_t>(x[idx]) + l1 * static_cast<acc_t>(y[idx]);
    if (base) acc += static_cast<acc_t>(base[idx]);
    out[idx] = static_cast<scalar_t>(acc);
  }
}

// Shared memory of separable_block_kernel: SeparableSmem, then a second [h, w] coefficient buffer.
template <typename acc_t>
size_t separable_block_smem_elements(const SeparableDims& s) {
  return SeparableSmem<acc_t>::elements(s) + size_t(s.h) * s.w;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) separable_block_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ v, const scalar_t* __restrict__ base_x,
    const scalar_t* __restrict__ base_v, scalar_t* __restrict__ out_x, scalar_t* __restrict__ out_v,
    const acc_t* __restrict__ B, const acc_t* __restrict__ CH, const acc_t* __restrict__ CW,
    const int64_t* __restrict__ band, SeparableDims s) {
  const SeparableSmem<acc_t> sm(s);
  acc_t* zv = sm.z + s.h * s.w;
  const int64_t img = blockIdx.x;
  const int64_t offset = img * s.H * s.W;
  const acc_t* Bb = B + img / s.C * s.K * 4;

  load_separable_basis(sm, s, CH, CW);
  separable_coefficients(sm, s, x + offset, sm.z);
  separable_coefficients(sm, s, v + offset, zv);
  for (int idx = threadIdx.x; idx < s.h * s.w; idx += blockDim.x) {  // each thread mixes the entries it wrote
    const int64_t label = band[idx];
    const acc_t cx = sm.z[idx], cv = zv[idx];
    sm.z[idx] = block_weight(Bb, label, s.K, 0) * cx + block_weight(Bb, label, s.K, 1) * cv;
    zv[idx] = block_weight(Bb, label, s.K, 2) * cx + block_weight(Bb, label, s.K, 3) * cv;
  }
  const acc_t* last = Bb + (s.K - 1) * 4;
  separable_block_output(sm, s, sm.z, last[0], last[1], x + offset, v + offset, base_x ? base_x + offset : nullptr,
                         out_x + offset);
  separable_block_output(sm, s, zv, last[2], last[3], x + offset, v + offset, base_v ? base_v + offset : nullptr,
                         out_v + offset);
}

// partial[img, k] = <P_k u, v> over one channel image for k < K-1, partial[img, K-1] = <u, v>.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) separable_dot_kernel(
    const scalar_t* __restrict__ u, const scalar_t* __restrict__ v, acc_t* __restrict__ partial,
    const acc_t* __restrict__ CH, const acc_t* __restrict__ CW, const int64_t* __restrict__ band, SeparableDims s) {
  const SeparableSmem<acc_t> sm(s);
  const int64_t img = blockIdx.x;
  const int64_t offset = img * s.H * s.W;
  const int n_coeff = s.h * s.w;

  load_separable_basis(sm, s, CH, CW);
  for (int pass = 0; pass < 2; ++pass) {
    __syncthreads();
    load_image(sm.x, (pass == 0 ? u : v) + offset, s.H * s.W);
    __syncthreads();
    left_analysis(sm, s);
    __syncthreads();
    for (int idx = threadIdx.x; idx < n_coeff; idx += blockDim.x) {
      const acc_t y = coefficient(sm, s, idx / s.w, idx % s.w);
      sm.z[idx] = pass == 0 ? y : sm.z[idx] * y;  // each thread owns its idx in both passes
    }
  }
  __syncthreads();
  for (int k = 0; k < s.K - 1; ++k) {
    acc_t acc = 0;
    for (int idx = threadIdx.x; idx < n_coeff; idx += blockDim.x)
      if (band[idx] == k) acc += sm.z[idx];
    acc = block_sum(acc, sm.scratch);
    if (threadIdx.x == 0) partial[img * s.K + k] = acc;
  }
  acc_t acc = 0;
  for (int idx = threadIdx.x; idx < s.H * s.W; idx += blockDim.x)
    acc += static_cast<acc_t>(u[offset + idx]) * sm.x[idx];  // sm.x holds v
  acc = block_sum(acc, sm.scratch);
  if (threadIdx.x == 0) partial[img * s.K + s.K - 1] = acc;
}

// out[b, k] = sum_r partial[b, r, k] (k < K-1); out[b, K-1] = sum_r partial[b, r, K-1] - sum_{k<K-1} out[b, k].
template <typename acc_t>
__global__ void reduce_partials_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out, int64_t B,
                                       int R, int K) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const acc_t* p = partial + b * R * K;
  acc_t inner = 0;
  for (int k = 0; k < K - 1; ++k) {
    acc_t acc = 0;
    for (int r = 0; r < R; ++r) acc += p[r * K + k];
    out[b * K + k] = acc;
    inner += acc;
  }
  acc_t total = 0;
  for (int r = 0; r < R; ++r) total += p[r * K + K - 1];
  out[b * K + K - 1] = total - inner;
}

template <typename acc_t>
void launch_reduce_partials(const at::Tensor& partial, at::Tensor& out, cudaStream_t stream) {
  const int64_t B = partial.size(0);
  const int threads = 128;
  const int blocks = static_cast<int>((B + threads - 1) / threads);
  reduce_partials_kernel<acc_t><<<blocks, threads, 0, stream>>>(
      partial.data_ptr<acc_t>(), out.data_ptr<acc_t>(), B, static_cast<int>(partial.size(1)),
      static_cast<int>(partial.size(2)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

SeparableDims separable_dims(const at::Tensor& u, const at::Tensor& CH, const at::Tensor& CW, int64_t K) {
  return SeparableDims{static_cast<int>(u.size(1)), static_cast<int>(u.size(2)), static_cast<int>(u.size(3)),
                       static_cast<int>(CH.size(0)), static_cast<int>(CW.size(0)), static_cast<int>(K)};
}

// ---------------------------------------------------------------- low-rank (PCA)

struct LowrankDims {
  int rows, r, K;
  int64_t d;
};

template <typename acc_t>
struct LowrankSmem {
  acc_t* scratch;  // kScratch
  acc_t* x;        // [kTileD]
  acc_t* y;        // [kTileD]
  acc_t* zu;       // [r]
  acc_t* zv;       // [r]

  static size_t elements(const LowrankDims& s) { return kScratch + 2 * size_t(kTileD) + 2 * size_t(s.r); }
  __device__ explicit LowrankSmem(const LowrankDims& s) {
    scratch = shared_buffer<acc_t>();
    x = scratch + kScratch;
    y = x + kTileD;
    zu = y + kTileD;
    zv = zu + s.r;
  }
};

// zu = Vg x (and zv = Vg y) into shared memory; returns this thread's share of <x, y> when y is given.
template <typename scalar_t, typename acc_t>
__device__ acc_t lowrank_analysis(const LowrankSmem<acc_t>& sm, const LowrankDims& s,
                                  const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                  const acc_t* __restrict__ Vg) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int n_warps = blockDim.x / kWarp;
  for (int i = threadIdx.x; i < s.r; i += blockDim.x) {
    sm.zu[i] = 0;
    sm.zv[i] = 0;
  }
  acc_t xy = 0;
  for (int64_t d0 = 0; d0 < s.d; d0 += kTileD) {
    const int len = s.d - d0 < kTileD ? static_cast<int>(s.d - d0) : kTileD;
    __syncthreads();  // previous tile consumed (and zu/zv initialised)
    for (int t = threadIdx.x; t < len; t += blockDim.x) {
      sm.x[t] = static_cast<acc_t>(x[d0 + t]);
      if (y) {
        sm.y[t] = static_cast<acc_t>(y[d0 + t]);
        xy += sm.x[t] * sm.y[t];
      }
    }
    __syncthreads();
    for (int row = warp; row < s.r; row += n_warps) {  // a warp owns a row: no race on zu[row]
      const acc_t* vr = Vg + int64_t(row) * s.d + d0;
      acc_t su = 0, sv = 0;
      for (int t = lane; t < len; t += kWarp) {
        const acc_t vv = vr[t];
        su += vv * sm.x[t];
        if (y) sv += vv * sm.y[t];
      }
      su = warp_sum(su);
      if (y) sv = warp_sum(sv);
      if (lane == 0) {
        sm.zu[row] += su;
        if (y) sm.zv[row] += sv;
      }
    }
  }
  __syncthreads();
  return xy;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) lowrank_combine_kernel(
    const scalar_t* __restrict__ u, const scalar_t* __restrict__ v, const scalar_t* __restrict__ base,
    scalar_t* __restrict__ out, const acc_t* __restrict__ a, const acc_t* __restrict__ c,
    const acc_t* __restrict__ V, const int64_t* __restrict__ vband, const int64_t* __restrict__ ids, LowrankDims s) {
  const LowrankSmem<acc_t> sm(s);
  const int64_t row = blockIdx.x;  // (sample, channel) for a spatial basis, sample for a joint one
  const int64_t b = row / s.rows;
  const int64_t g = ids ? ids[b] : 0;
  const acc_t* Vg = V + g * s.r * s.d;
  const int64_t offset = row * s.d;
  const acc_t* ab = a + b * s.K;
  const acc_t* cb = v ? c + b * s.K : nullptr;

  lowrank_analysis(sm, s, u + offset, v ? v + offset : nullptr, Vg);
  const acc_t a_last = ab[s.K - 1];
  const acc_t c_last = v ? cb[s.K - 1] : acc_t(0);
  for (int i = threadIdx.x; i < s.r; i += blockDim.x) {
    const int64_t label = vband[i];
    acc_t z = (ab[label] - a_last) * sm.zu[i];
    if (v) z += (cb[label] - c_last) * sm.zv[i];
    sm.zu[i] = z;
  }
  __syncthreads();
  for (int64_t t = threadIdx.x; t < s.d; t += blockDim.x) {
    acc_t acc = 0;
    for (int i = 0; i < s.r; ++i) acc += Vg[int64_t(i) * s.d + t] * sm.zu[i];  // coalesced along d
    acc += a_last * static_cast<acc_t>(u[offset + t]);
    if (v) acc += c_last * static_cast<acc_t>(v[offset + t]);
    if (base) acc += static_cast<acc_t>(base[offset + t]);
    out[offset + t] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) lowrank_block_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ v, const scalar_t* __restrict__ base_x,
    const scalar_t* __restrict__ base_v, scalar_t* __restrict__ out_x, scalar_t* __restrict__ out_v,
    const acc_t* __restrict__ B, const acc_t* __restrict__ V, const int64_t* __restrict__ vband,
    const int64_t* __restrict__ ids, LowrankDims s) {
  const LowrankSmem<acc_t> sm(s);
  const int64_t row = blockIdx.x;  // (sample, channel) for a spatial basis, sample for a joint one
  const int64_t b = row / s.rows;
  const int64_t g = ids ? ids[b] : 0;
  const acc_t* Vg = V + g * s.r * s.d;
  const int64_t offset = row * s.d;
  const acc_t* Bb = B + b * s.K * 4;

  lowrank_analysis(sm, s, x + offset, v + offset, Vg);
  for (int i = threadIdx.x; i < s.r; i += blockDim.x) {
    const int64_t label = vband[i];
    const acc_t cx = sm.zu[i], cv = sm.zv[i];
    sm.zu[i] = block_weight(Bb, label, s.K, 0) * cx + block_weight(Bb, label, s.K, 1) * cv;
    sm.zv[i] = block_weight(Bb, label, s.K, 2) * cx + block_weight(Bb, label, s.K, 3) * cv;
  }
  __syncthreads();
  const acc_t* last = Bb + (s.K - 1) * 4;
  for (int64_t t = threadIdx.x; t < s.d; t += blockDim.x) {
    acc_t ax = 0, av = 0;
    for (int i = 0; i < s.r; ++i) {  // one read of V[g] for both outputs, coalesced along d
      const acc_t vv = Vg[int64_t(i) * s.d + t];
      ax += vv * sm.zu[i];
      av += vv * sm.zv[i];
    }
    const acc_t xv = static_cast<acc_t>(x[offset + t]), yv = static_cast<acc_t>(v[offset + t]);
    ax += last[0] * xv + last[1] * yv;
    av += last[2] * xv + last[3] * yv;
    if (base_x) ax += static_cast<acc_t>(base_x[offset + t]);
    if (base_v) av += static_cast<acc_t>(base_v[offset + t]);
    out_x[offset + t] = static_cast<scalar_t>(ax);
    out_v[offset + t] = static_cast<scalar_t>(av);
  }
}

// partial[row, k] = sum_{i: vband[i] == k} zu[i] zv[i] for k < K-1, partial[row, K-1] = <x, y> over the row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) lowrank_dot_kernel(
    const scalar_t* __restrict__ u, const scalar_t* __restrict__ v, acc_t* __restrict__ partial,
    const acc_t* __restrict__ V, const int64_t* __restrict__ vband, const int64_t* __restrict__ ids, LowrankDims s) {
  const LowrankSmem<acc_t> sm(s);
  const int64_t row = blockIdx.x;
  const int64_t b = row / s.rows;
  const int64_t g = ids ? ids[b] : 0;
  const int64_t offset = row * s.d;

  const acc_t xy = lowrank_analysis(sm, s, u + offset, v + offset, V + g * s.r * s.d);
  for (int k = 0; k < s.K - 1; ++k) {
    acc_t acc = 0;
    for (int i = threadIdx.x; i < s.r; i += blockDim.x)
      if (vband[i] == k) acc += sm.zu[i] * sm.zv[i];
    acc = block_sum(acc, sm.scratch);
    if (threadIdx.x == 0) partial[row * s.K + k] = acc;
  }
  const acc_t total = block_sum(xy, sm.scratch);
  if (threadIdx.x == 0) partial[row * s.K + s.K - 1] = total;
}

LowrankDims lowrank_dims(const at::Tensor& u, const at::Tensor& V, int64_t K) {
  const int64_t C = u.size(1), HW = u.size(2) * u.size(3);
  const int64_t d = V.size(2);
  const int rows = d == HW ? static_cast<int>(C) : 1;  // spatial basis: per channel; joint: whole image
  return LowrankDims{rows, static_cast<int>(V.size(1)), static_cast<int>(K), d};
}

at::ScalarType compute_type(const at::Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor separable_combine_cuda(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                                  const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                                  const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band) {
  const c10::cuda::CUDAGuard guard(u.device());
  auto out = at::empty_like(u);
  if (u.numel() == 0) return out;
  const SeparableDims s = separable_dims(u, CH, CW, a.size(1));
  const auto blocks = static_cast<unsigned int>(u.size(0) * u.size(1));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "separable_combine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = SeparableSmem<acc_t>::elements(s) * sizeof(acc_t);
    auto kernel = separable_combine_kernel<scalar_t, acc_t>;
    prepare_dynamic_smem(kernel, smem, "separable_combine_cuda");
    kernel<<<blocks, kThreads, smem, stream>>>(
        u.data_ptr<scalar_t>(), optional_ptr<scalar_t>(v), optional_ptr<scalar_t>(base), out.data_ptr<scalar_t>(),
        a.data_ptr<acc_t>(), optional_ptr<acc_t>(c), CH.data_ptr<acc_t>(), CW.data_ptr<acc_t>(),
        band.data_ptr<int64_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor separable_dot_cuda(const at::Tensor& u, const at::Tensor& v, const at::Tensor& CH, const at::Tensor& CW,
                              const at::Tensor& band, int64_t K) {
  const c10::cuda::CUDAGuard guard(u.device());
  const auto opts = u.options().dtype(compute_type(u));
  const int64_t B = u.size(0), C = u.size(1);
  if (u.numel() == 0) return at::zeros({B, K}, opts);
  auto out = at::empty({B, K}, opts);
  auto partial = at::empty({B, C, K}, opts);
  const SeparableDims s = separable_dims(u, CH, CW, K);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "separable_dot_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = SeparableSmem<acc_t>::elements(s) * sizeof(acc_t);
    auto kernel = separable_dot_kernel<scalar_t, acc_t>;
    prepare_dynamic_smem(kernel, smem, "separable_dot_cuda");
    kernel<<<static_cast<unsigned int>(B * C), kThreads, smem, stream>>>(
        u.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), CH.data_ptr<acc_t>(),
        CW.data_ptr<acc_t>(), band.data_ptr<int64_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_reduce_partials<acc_t>(partial, out, stream);
  });
  return out;
}

at::Tensor lowrank_combine_cuda(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                                const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                                const at::Tensor& V, const at::Tensor& vband, const c10::optional<at::Tensor>& ids) {
  const c10::cuda::CUDAGuard guard(u.device());
  auto out = at::empty_like(u);
  if (u.numel() == 0) return out;
  const LowrankDims s = lowrank_dims(u, V, a.size(1));
  const auto blocks = static_cast<unsigned int>(u.size(0) * s.rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "lowrank_combine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = LowrankSmem<acc_t>::elements(s) * sizeof(acc_t);
    auto kernel = lowrank_combine_kernel<scalar_t, acc_t>;
    prepare_dynamic_smem(kernel, smem, "lowrank_combine_cuda");
    kernel<<<blocks, kThreads, smem, stream>>>(
        u.data_ptr<scalar_t>(), optional_ptr<scalar_t>(v), optional_ptr<scalar_t>(base), out.data_ptr<scalar_t>(),
        a.data_ptr<acc_t>(), optional_ptr<acc_t>(c), V.data_ptr<acc_t>(), vband.data_ptr<int64_t>(),
        optional_ptr<int64_t>(ids), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor lowrank_dot_cuda(const at::Tensor& u, const at::Tensor& v, const at::Tensor& V, const at::Tensor& vband,
                            const c10::optional<at::Tensor>& ids, int64_t K) {
  const c10::cuda::CUDAGuard guard(u.device());
  const auto opts = u.options().dtype(compute_type(u));
  const int64_t B = u.size(0);
  if (u.numel() == 0) return at::zeros({B, K}, opts);
  auto out = at::empty({B, K}, opts);
  const LowrankDims s = lowrank_dims(u, V, K);
  auto partial = at::empty({B, s.rows, K}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "lowrank_dot_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = LowrankSmem<acc_t>::elements(s) * sizeof(acc_t);
    auto kernel = lowrank_dot_kernel<scalar_t, acc_t>;
    prepare_dynamic_smem(kernel, smem, "lowrank_dot_cuda");
    kernel<<<static_cast<unsigned int>(B * s.rows), kThreads, smem, stream>>>(
        u.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), V.data_ptr<acc_t>(),
        vband.data_ptr<int64_t>(), optional_ptr<int64_t>(ids), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_reduce_partials<acc_t>(partial, out, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> separable_block_combine_cuda(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& B, const c10::optional<at::Tensor>& base_x,
    const c10::optional<at::Tensor>& base_v, const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto out_x = at::empty_like(x);
  auto out_v = at::empty_like(x);
  if (x.numel() == 0) return {out_x, out_v};
  const SeparableDims s = separable_dims(x, CH, CW, B.size(1));
  const auto blocks = static_cast<unsigned int>(x.size(0) * x.size(1));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "separable_block_combine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = separable_block_smem_elements<acc_t>(s) * sizeof(acc_t);
    auto kernel = separable_block_kernel<scalar_t, acc_t>;
    prepare_dynamic_smem(kernel, smem, "separable_block_combine_cuda");
    kernel<<<blocks, kThreads, smem, stream>>>(
        x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), optional_ptr<scalar_t>(base_x),
        optional_ptr<scalar_t>(base_v), out_x.data_ptr<scalar_t>(), out_v.data_ptr<scalar_t>(), B.data_ptr<acc_t>(),
        CH.data_ptr<acc_t>(), CW.data_ptr<acc_t>(), band.data_ptr<int64_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_x, out_v};
}

std::tuple<at::Tensor, at::Tensor> lowrank_block_combine_cuda(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& B, const c10::optional<at::Tensor>& base_x,
    const c10::optional<at::Tensor>& base_v, const at::Tensor& V, const at::Tensor& vband,
    const c10::optional<at::Tensor>& ids) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto out_x = at::empty_like(x);
  auto out_v = at::empty_like(x);
  if (x.numel() == 0) return {out_x, out_v};
  const LowrankDims s = lowrank_dims(x, V, B.size(1));
  const auto blocks = static_cast<unsigned int>(x.size(0) * s.rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_block_combine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = LowrankSmem<acc_t>::elements(s) * sizeof(acc_t);
    auto kernel = lowrank_block_kernel<scalar_t, acc_t>;
    prepare_dynamic_smem(kernel, smem, "lowrank_block_combine_cuda");
    kernel<<<blocks, kThreads, smem, stream>>>(
        x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), optional_ptr<scalar_t>(base_x),
        optional_ptr<scalar_t>(base_v), out_x.data_ptr<scalar_t>(), out_v.data_ptr<scalar_t>(), B.data_ptr<acc_t>(),
        V.data_ptr<acc_t>(), vband.data_ptr<int64_t>(), optional_ptr<int64_t>(ids), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_x, out_v};
}
