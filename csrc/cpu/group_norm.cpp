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

// exp(x) for float, |error| about 2 ulp on [-87, 88.3] (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r,
// 2^n through the exponent bits); inputs are clamped to [-87, 89], where the top gives inf (2^128), so that SiLU's
// z / (1 + exp(-z)) is -0 for a huge negative z (and NaN for -inf, as PyTorch's). Plain arithmetic, so the loop
// vectorises.
ANISO_FAST_INLINE float exp_poly(float x) {
  x = std::min(std::max(x, -87.0f), 89.0f);  // min/max, not a branch: GCC vectorises it for every ISA; 89 -> inf
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

// Sample n's group statistics from its per-channel shifted sums and sums of squares (double; `shift` [C] holds
// each group's shift in every channel of the group): the mean and 1/std per group into call.mean / call.rstd, and
// per channel the mean as hi + lo (so that (x - hi) - lo keeps its double precision) and the scale 1/std * weight.
template <typename scalar_t, typename acc_t, typename shift_t>
ANISO_FAST_INLINE void finish_groups(const GroupNormCall<scalar_t, acc_t>& call, int64_t n, const double* sums,
                                     const double* squares, const shift_t* shift, acc_t* group_mean,
                                     acc_t* mean_lo, acc_t* scale) {
  const int64_t G = call.G, Cg = call.C / call.G;
  const double count = static_cast<double>(call.HW * Cg);
  for (int64_t g = 0; g < G; ++g) {
    double S = 0, Q = 0;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      S += sums[c];
      Q += squares[c];
    }
    const double shifted_mean = S / count;
    const double var = std::max(Q / count - shifted_mean * shifted_mean, 0.0);
    const double m = static_cast<double>(shift[g * Cg]) + shifted_mean;
    const double r = 1.0 / std::sqrt(var + call.eps);
    const acc_t hi = static_cast<acc_t>(m);
    const acc_t lo = static_cast<acc_t>(m - static_cast<double>(hi));
    call.mean[n * G + g] = hi;
    call.rstd[n * G + g] = static_cast<acc_t>(r);
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      group_mean[c] = hi;
      mean_lo[c] = lo;
      scale[c] = static_cast<acc_t>(r * static_cast<double>(call.weight[c]));
    }
  }
}

template <typename scalar_t, typename acc_t>
ANISO_FAST_INLINE void group_norm_samples(const GroupNormCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  const int64_t HW = call.HW, C = call.C, G = call.G, Cg = C / G;
  std::vector<double> sums(C), squares(C), shifts(C);
  std::vector<acc_t> group_mean(C), mean_lo(C), scale(C), block_buffer(kPixels * C);
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
    finish_groups(call, n, s, q, k, group_mean.data(), mean_lo.data(), scale.data());
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

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ANISO_FAST_HAS_GN_AVX512 1
// The AVX-512 variant for fp32 and bf16 with C a multiple of 16, written with intrinsics (GCC's vectorisation of
// the generic loops above left them at half the speed of PyTorch's contiguous kernel, bench/RESULTS.md):
// - statistics in float over blocks of kPixels pixels, up to 8 x 16 channels in registers along the rows, each
//   block's sums then added into the double per-channel sums: a block adds at most kPixels shifted values, so
//   float keeps the sums to about 1e-6 of their size;
// - one normalising pass: load, centre, scale, shift, SiLU (the exp by Cephes' polynomial and vscalefps),
//   narrow, store.
#include <immintrin.h>
#define ANISO_FAST_GN512 __attribute__((target("avx512f,avx2,fma"), always_inline)) inline

ANISO_FAST_GN512 __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
ANISO_FAST_GN512 __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
ANISO_FAST_GN512 void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
ANISO_FAST_GN512 void store16(c10::BFloat16* p, __m512 v) {  // round to nearest even, NaN kept a NaN
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
// exp as exp_poly above: x = n ln2 + r, the same polynomial in r, times 2^n (vscalefps)
ANISO_FAST_GN512 __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(89.0f));  // 89 -> inf
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
ANISO_FAST_GN512 __m512 silu16(__m512 z) {
  // z / d with d = 1 + exp(-z) in [1, inf]: 1/d from vrcp14ps (relative error below 2^-14) and one Newton step
  // (below 2^-27, under float's rounding), cheaper than vdivps. d = inf: 1/d = 0 set directly (the Newton step
  // would make inf * 0 = NaN), so z * 0 = -0 as z / inf would be (NaN for z = -inf, as PyTorch's silu)
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), z)));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
  r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(d, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), _mm512_setzero_ps());
  return _mm512_mul_ps(z, r);
}

constexpr int64_t kShiftPixels = 16;  // pixels whose mean shifts a group's data before the float sums
constexpr int64_t kMaxChunks = 8;  // 16-channel registers of sums and of squares held at once (2 x 8 of 32)

// The shifted sums and sums of squares of `rows` pixel rows (stride C) over NC * 16 channels, accumulated in
// float registers along the rows (contiguous loads), then added into the double per-channel sums.
template <int NC, typename scalar_t>
ANISO_FAST_GN512 void stats_rows(const scalar_t* x, int64_t rows, int64_t C, const float* shifts, double* sums,
                                 double* squares) {
  __m512 s[NC], q[NC], k[NC];
  for (int j = 0; j < NC; ++j) {
    s[j] = _mm512_setzero_ps();
    q[j] = s[j];
    k[j] = _mm512_loadu_ps(shifts + 16 * j);
  }
  for (int64_t p = 0; p < rows; ++p) {
    const scalar_t* row = x + p * C;
    for (int j = 0; j < NC; ++j) {
      const __m512 d = _mm512_sub_ps(load16(row + 16 * j), k[j]);
      s[j] = _mm512_add_ps(s[j], d);
      q[j] = _mm512_fmadd_ps(d, d, q[j]);
    }
  }
  for (int j = 0; j < NC; ++j) {
    double* sd = sums + 16 * j;
    double* qd = squares + 16 * j;
    const __m256 s_hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s[j]), 1));
    const __m256 q_hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(q[j]), 1));
    _mm512_storeu_pd(sd, _mm512_add_pd(_mm512_loadu_pd(sd), _mm512_cvtps_pd(_mm512_castps512_ps256(s[j]))));
    _mm512_storeu_pd(sd + 8, _mm512_add_pd(_mm512_loadu_pd(sd + 8), _mm512_cvtps_pd(s_hi)));
    _mm512_storeu_pd(qd, _mm512_add_pd(_mm512_loadu_pd(qd), _mm512_cvtps_pd(_mm512_castps512_ps256(q[j]))));
    _mm512_storeu_pd(qd + 8, _mm512_add_pd(_mm512_loadu_pd(qd + 8), _mm512_cvtps_pd(q_hi)));
  }
}

template <typename scalar_t>
__attribute__((target("avx512f,avx2,fma"))) void group_norm_avx512_vec(const GroupNormCall<scalar_t, float>& call,
                                                                       int64_t begin, int64_t end) {
  const int64_t HW = call.HW, C = call.C, G = call.G, Cg = C / G;
  std::vector<double> sums(C), squares(C);
  std::vector<float> shifts(C), group_mean(C), mean_lo(C), scale(C);
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* x = call.x + n * HW * C;
    scalar_t* y = call.y + n * HW * C;
    // the shift of each group: the mean of kShiftPixels pixels spread over the image (the shifted-data algorithm;
    // float sums keep about 1e-6 of var + (mean - shift)^2, so the shift must be near the mean: not one value,
    // which may be an outlier, nor a border row, which padding may offset)
    const int64_t picks = std::min(kShiftPixels, HW);
    for (int64_t g = 0; g < G; ++g) {
      double m0 = 0;
      for (int64_t i = 0; i < picks; ++i)
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) m0 += load<scalar_t, double>(x + (i * HW / picks) * C, c);
      std::fill(shifts.begin() + g * Cg, shifts.begin() + (g + 1) * Cg, static_cast<float>(m0 / (picks * Cg)));
    }
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(squares.begin(), squares.end(), 0.0);
    for (int64_t p0 = 0; p0 < HW; p0 += kPixels) {
      const int64_t rows = std::min(kPixels, HW - p0);
      for (int64_t c0 = 0; c0 < C; c0 += 16 * kMaxChunks) {
        const scalar_t* block = x + p0 * C + c0;
        const float* k = shifts.data() + c0;
        double* sd = sums.data() + c0;
        double* qd = squares.data() + c0;
        switch (std::min<int64_t>(kMaxChunks, (C - c0) / 16)) {
          case 1: stats_rows<1>(block, rows, C, k, sd, qd); break;
          case 2: stats_rows<2>(block, rows, C, k, sd, qd); break;
          case 3: stats_rows<3>(block, rows, C, k, sd, qd); break;
          case 4: stats_rows<4>(block, rows, C, k, sd, qd); break;
          case 5: stats_rows<5>(block, rows, C, k, sd, qd); break;
          case 6: stats_rows<6>(block, rows, C, k, sd, qd); break;
          case 7: stats_rows<7>(block, rows, C, k, sd, qd); break;
          default: stats_rows<8>(block, rows, C, k, sd, qd); break;
        }
      }
    }
    finish_groups(call, n, sums.data(), squares.data(), shifts.data(), group_mean.data(), mean_lo.data(),
                  scale.data());
    for (int64_t p = 0; p < HW; ++p) {
      const scalar_t* row = x + p * C;
      scalar_t* out = y + p * C;
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        __m512 v = _mm512_sub_ps(_mm512_sub_ps(load16(row + c0), _mm512_loadu_ps(group_mean.data() + c0)),
                                 _mm512_loadu_ps(mean_lo.data() + c0));
        v = _mm512_fmadd_ps(v, _mm512_loadu_ps(scale.data() + c0), _mm512_loadu_ps(call.bias + c0));
        if (call.silu) v = silu16(v);
        store16(out + c0, v);
      }
    }
  }
}
#endif

// The intrinsics variant where it exists (fp32 and bf16 on x86 with GCC/Clang): true if it ran.
template <typename scalar_t, typename acc_t>
bool group_norm_vec(const GroupNormCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
#ifdef ANISO_FAST_HAS_GN_AVX512
  if constexpr (std::is_same_v<acc_t, float> &&
                (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>)) {
    group_norm_avx512_vec<scalar_t>(call, begin, end);
    return true;
  }
#endif
  return false;
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
      if (isa == Isa::kAvx512 && C % 16 == 0 && group_norm_vec(call, begin, end)) return;
      if (isa == Isa::kAvx512) group_norm_avx512(call, begin, end);
      else if (isa == Isa::kAvx) group_norm_avx(call, begin, end);
      else group_norm_base(call, begin, end);
    });
  });
  return {y, mean, rstd};
}
