// GroupNorm, optionally fused with SiLU, over channels_last (NHWC) images on CPU: the U-Net's normalisation when
// the network runs channels_last (networks.execution), where PyTorch's own kernel is slow (bench/RESULTS.md).
//
// One task per sample. Per sample two passes over its [H*W, C] rows, each a loop over pixels with the channels
// innermost (contiguous, vectorised): the per-channel sums and sums of squares (double, of shifted data), then
// y = (x - mean_g) * scale_c + bias_c with the group's statistics and the affine weight folded into one scale per
// channel, and SiLU on the result.
// SiLU's exp is a polynomial the compiler vectorises (std::exp in a loop is not vectorised without -ffast-math).
#include "../norm.h"
#include "isa.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

#define ANISO_FAST_INLINE inline __attribute__((always_inline))

// Element -> accumulation type. bf16 is the top half of a float: a shift the compiler vectorises.
template <typename scalar_t, typename acc_t>
ANISO_FAST_INLINE acc_t load(const scalar_t* p, int64_t i) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return static_cast<acc_t>(f);
  } else {
    return static_cast<acc_t>(p[i]);
  }
}

// float -> element. bf16: round to nearest even (NaN kept a NaN), as c10::BFloat16 does, written so it vectorises.
template <typename scalar_t, typename acc_t>
ANISO_FAST_INLINE void store(scalar_t* p, int64_t i, acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    float f = static_cast<float>(v);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
  } else {
    p[i] = static_cast<scalar_t>(v);
  }
}

// exp(x) for float, |error| about 2 ulp on [-87, 88] (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r,
// 2^n through the exponent bits); inputs are clamped to that range. Plain arithmetic, so the loop vectorises.
ANISO_FAST_INLINE float exp_poly(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);  // min/max, not a branch: GCC vectorises it for every ISA
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  int32_t shifter_bits;
  std::memcpy(&shifter_bits, &shifter, sizeof(shifter_bits));
  const int32_t bits = (ti - shifter_bits + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename acc_t>
ANISO_FAST_INLINE acc_t silu(acc_t z) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return z / (1.0 + std::exp(-z));
  } else {
    return z / (1.0f + exp_poly(-z));
  }
}

template <typename scalar_t, typename acc_t>
struct GroupNormCall {
  const scalar_t* x;
  const acc_t* weight;
  const acc_t* bias;
  scalar_t* y;
  acc_t* mean;  // [N, G]
  acc_t* rstd;  // [N, G]
  int64_t HW, C, G;
  double eps;
  bool silu;
};

constexpr int64_t kPixels = 64;  // pixels per block of the normalising pass (a block of acc_t stays in L1/L2)

template <typename scalar_t, typename acc_t>
ANISO_FAST_INLINE void group_norm_samples(const GroupNormCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  const int64_t HW = call.HW, C = call.C, G = call.G, Cg = C / G;
  std::vector<double> sums(C), squares(C), shifts(C);
  std::vector<acc_t> group_mean(C), mean_lo(C), scale(C), block_buffer(kPixels * C);
  const double count = static_cast<double>(HW * Cg);
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* x = call.x + n * HW * C;
    scalar_t* y = call.y + n * HW * C;
    // 1: one pass for the statistics: per channel the sum and the sum of squares of x - k_g, in double, where
    // k_g is the group's first value: a shift that keeps var = Q/n - (S/n)^2 free of cancellation when the mean
    // is large against the spread (the shifted-data algorithm).
    double* s = sums.data();
    double* q = squares.data();
    double* k = shifts.data();
    for (int64_t c = 0; c < C; ++c) k[c] = load<scalar_t, double>(x, (c / Cg) * Cg);
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(squares.begin(), squares.end(), 0.0);
    for (int64_t p = 0; p < HW; ++p) {
      const scalar_t* row = x + p * C;
      for (int64_t c = 0; c < C; ++c) {
        const double d = load<scalar_t, double>(row, c) - k[c];
        s[c] += d;
        q[c] += d * d;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      double S = 0, Q = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        S += s[c];
        Q += q[c];
      }
      const double shifted_mean = S / count;
      const double var = std::max(Q / count - shifted_mean * shifted_mean, 0.0);
      const double m = k[g * Cg] + shifted_mean;
      const double r = 1.0 / std::sqrt(var + call.eps);
      const acc_t hi = static_cast<acc_t>(m);  // the mean as hi + lo: (x - hi) - lo keeps its double precision
      const acc_t lo = static_cast<acc_t>(m - static_cast<double>(hi));
      call.mean[n * G + g] = static_cast<acc_t>(m);
      call.rstd[n * G + g] = static_cast<acc_t>(r);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        group_mean[c] = hi;
        mean_lo[c] = lo;
        scale[c] = static_cast<acc_t>(r * static_cast<double>(call.weight[c]));
      }
    }
    const acc_t* gm = group_mean.data();
    const acc_t* ml = mean_lo.data();
    // 3: normalise, affine, SiLU: (x - mean) * (rstd * weight) + bias (centred first: no cancellation when the
    // spread is small against the mean)
    const acc_t* a = scale.data();
    const acc_t* b = call.bias;
    // The values go through a block of acc_t, then to the output dtype: a loop that both evaluates SiLU and
    // narrows to bf16 is not vectorised by GCC, the loops apart are.
    // Blocks of kPixels rows: SiLU and the narrowing run over a block at once (the output rows are contiguous).
    acc_t* t = block_buffer.data();
    for (int64_t p0 = 0; p0 < HW; p0 += kPixels) {
      const int64_t rows = std::min(kPixels, HW - p0);
      for (int64_t p = 0; p < rows; ++p) {
        const scalar_t* row = x + (p0 + p) * C;
        acc_t* tr = t + p * C;
        for (int64_t c = 0; c < C; ++c) tr[c] = (load<scalar_t, acc_t>(row, c) - gm[c] - ml[c]) * a[c] + b[c];
      }
      const int64_t m = rows * C;
      if (call.silu)
        for (int64_t i = 0; i < m; ++i) t[i] = silu(t[i]);
      scalar_t* out = y + p0 * C;
      for (int64_t i = 0; i < m; ++i) store<scalar_t, acc_t>(out, i, t[i]);
    }
  }
}

template <typename scalar_t, typename acc_t>
ANISO_FAST_AVX512 void group_norm_avx512(const GroupNormCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  group_norm_samples(call, begin, end);
}
template <typename scalar_t, typename acc_t>
ANISO_FAST_AVX void group_norm_avx(const GroupNormCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  group_norm_samples(call, begin, end);
}
template <typename scalar_t, typename acc_t>
void group_norm_base(const GroupNormCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  group_norm_samples(call, begin, end);
}

}  // namespace

// x [N, C, H, W] channels_last-contiguous (fp16, bf16, fp32 or fp64) on the CPU; weight, bias [C] contiguous in the
// compute dtype (fp32; fp64 for fp64); C divisible by groups (checked by aniso_fast/ops/norm.py). Returns y (x's
// shape, dtype and memory format) and the per-(sample, group) mean and 1/std [N, G] in the compute dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_nhwc_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, int64_t groups, double eps,
                                                                   bool silu) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({N, groups}, weight.options());
  at::Tensor rstd = at::empty({N, groups}, weight.options());
  const Isa isa = best_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_nhwc_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GroupNormCall<scalar_t, acc_t> call{x.data_ptr<scalar_t>(), weight.data_ptr<acc_t>(),
                                              bias.data_ptr<acc_t>(),  y.data_ptr<scalar_t>(),
                                              mean.data_ptr<acc_t>(),  rstd.data_ptr<acc_t>(),
                                              HW, C, groups, eps, silu};
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      if (isa == Isa::kAvx512) group_norm_avx512(call, begin, end);
      else if (isa == Isa::kAvx) group_norm_avx(call, begin, end);
      else group_norm_base(call, begin, end);
    });
  });
  return {y, mean, rstd};
}
