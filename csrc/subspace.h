// Subspace ops of aniso_fast (docs/DESIGN.md, "The subspace op contract"): C++ CPU and CUDA entry points.
//
// Preconditions guaranteed by the Python dispatch layer (aniso_fast/ops.py) before any backend is called;
// kernels may rely on them and do not re-check:
//  - u is 4-D [B, C, H, W], floating (fp16, bf16, fp32 or fp64), contiguous; v and base, when present, have
//    exactly u's shape, dtype and device and are contiguous. Either v and c are both present or both absent.
//  - a and c are [B, K] with K >= 1, contiguous, in the compute dtype (fp32, or fp64 for fp64 inputs), on u's
//    device.
//  - CH [h, H] and CW [w, W] (separable) and V [G, r, d] (low-rank, d == H*W "spatial, per channel" or
//    d == C*H*W "joint") are contiguous, in the compute dtype, on u's device, with 1 <= h <= H, 1 <= w <= W,
//    1 <= r.
//  - band [h, w] and vband [r] are int64, contiguous, on u's device, with values in [0, K).
//  - ids, when present, is [B] int64 contiguous on u's device with values in [0, G); when absent G == 1.
//    (On CUDA the range check is a torch._assert_async, i.e. it fires asynchronously.)
//  - K passed to the dot functions equals the K of the band labels' range (band values < K).
//  - block_combine(x, v, B, base_x, base_v): x is u above; v, base_x and base_v (optional) have x's shape, dtype
//    and device and are contiguous; B is [B, K, 2, 2], K >= 1, contiguous, in the compute dtype, on x's device.
// Results: combine returns a new tensor of u's shape and dtype (never aliasing an input); dot returns a new
// [B, K] tensor in the compute dtype; block_combine returns two new tensors (x', v') of x's shape and dtype.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

// Declared for each backend suffix: _cpu (csrc/cpu/*.cpp) and _cuda (csrc/cuda/*.cu, built only with a CUDA
// toolkit and a CUDA build of torch; then WITH_CUDA is defined).

at::Tensor separable_combine_cpu(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                                  const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                                  const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band);
at::Tensor separable_dot_cpu(const at::Tensor& u, const at::Tensor& v, const at::Tensor& CH, const at::Tensor& CW,
                              const at::Tensor& band, int64_t K);
at::Tensor lowrank_combine_cpu(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                                const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                                const at::Tensor& V, const at::Tensor& vband, const c10::optional<at::Tensor>& ids);
at::Tensor lowrank_dot_cpu(const at::Tensor& u, const at::Tensor& v, const at::Tensor& V, const at::Tensor& vband,
                            const c10::optional<at::Tensor>& ids, int64_t K);
std::tuple<at::Tensor, at::Tensor> separable_block_combine_cpu(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& B, const c10::optional<at::Tensor>& base_x,
    const c10::optional<at::Tensor>& base_v, const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band);
std::tuple<at::Tensor, at::Tensor> lowrank_block_combine_cpu(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& B, const c10::optional<at::Tensor>& base_x,
    const c10::optional<at::Tensor>& base_v, const at::Tensor& V, const at::Tensor& vband,
    const c10::optional<at::Tensor>& ids);

at::Tensor separable_combine_cuda(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                                  const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                                  const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band);
at::Tensor separable_dot_cuda(const at::Tensor& u, const at::Tensor& v, const at::Tensor& CH, const at::Tensor& CW,
                              const at::Tensor& band, int64_t K);
at::Tensor lowrank_combine_cuda(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                                const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                                const at::Tensor& V, const at::Tensor& vband, const c10::optional<at::Tensor>& ids);
at::Tensor lowrank_dot_cuda(const at::Tensor& u, const at::Tensor& v, const at::Tensor& V, const at::Tensor& vband,
                            const c10::optional<at::Tensor>& ids, int64_t K);
std::tuple<at::Tensor, at::Tensor> separable_block_combine_cuda(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& B, const c10::optional<at::Tensor>& base_x,
    const c10::optional<at::Tensor>& base_v, const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band);
std::tuple<at::Tensor, at::Tensor> lowrank_block_combine_cuda(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& B, const c10::optional<at::Tensor>& base_x,
    const c10::optional<at::Tensor>& base_v, const at::Tensor& V, const at::Tensor& vband,
    const c10::optional<at::Tensor>& ids);
