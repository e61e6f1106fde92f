// The networks' normalisation op on CPU (csrc/cpu/group_norm.cpp): GroupNorm, optionally fused with SiLU, over
// channels_last images. Preconditions (checked by aniso_fast/ops/norm.py before the call): x is 4-D, on the CPU,
// channels_last-contiguous, fp16/bf16/fp32/fp64; weight and bias are [C], contiguous, in the compute dtype (fp32,
// fp64 for fp64 x); C is divisible by groups >= 1; eps > 0.
// Returns (y, mean, rstd): y has x's shape, dtype and memory format; mean and rstd are [N, groups] in the compute
// dtype (the statistics the backward needs).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_nhwc_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, int64_t groups, double eps,
                                                                   bool silu);
