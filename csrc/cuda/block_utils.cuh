// Small device/host helpers shared by the CUDA subspace kernels: deterministic warp/block sums and the
// dynamic shared-memory opt-in. Reductions use a fixed shuffle tree, so a result never depends on scheduling.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace aniso_fast_cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T val) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) val += __shfl_down_sync(0xffffffffu, val, offset);
  return val;
}

// Sum over the block; the result is valid in thread 0. `scratch` holds >= 32 values in shared memory.
// Begins with a barrier so that scratch (and any shared buffer the caller just wrote) may be reused freely.
template <typename T>
__device__ __forceinline__ T block_sum(T val, T* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  val = warp_sum(val);
  __syncthreads();
  if (lane == 0) scratch[warp] = val;
  __syncthreads();
  const int n_warps = (blockDim.x + kWarp - 1) / kWarp;
  val = threadIdx.x < n_warps ? scratch[threadIdx.x] : T(0);
  if (warp == 0) val = warp_sum(val);
  return val;
}

// Checks that `bytes` of dynamic shared memory fit one block on the current device and opts the kernel in
// above the 48 KiB default.
template <typename Kernel>
inline void prepare_dynamic_smem(Kernel kernel, size_t bytes, const char* what) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), what, ": needs ", bytes,
              " bytes of shared memory per block, the device allows ", optin);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

}  // namespace aniso_fast_cuda
