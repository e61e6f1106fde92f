// Separable (DCT) subspace ops on CPU: combine, dot and block_combine (docs/DESIGN.md, "The subspace op contract").
//
// One task per channel image (combine) or per sample (dot). Per image the truncated transform Y = CH X CW^T is
// kept in a small per-thread scratch between analysis, weighting and synthesis, and the output is written once.
// Only the rows of CH and columns of CW that carry a label below K-1 are touched: the rest feeds the complement,
// whose scalar is applied to the whole image (P_{K-1} = I - sum_{k<K-1} P_k). The four small products per image
// go through a register-blocked GEMM: fixed-size blocks of C the compiler keeps in registers and vectorises over
// columns (no reduction is reassociated, so results do not depend on -ffast-math).
#include "../subspace.h"
#include "isa.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

#define ANISO_FAST_INLINE inline __attribute__((always_inline))

template <typename acc_t>
ANISO_FAST_INLINE void axpy(acc_t* __restrict y, acc_t alpha, const acc_t* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// A SIMD register of VB bytes (GCC/Clang vector extension; unaligned loads and stores, may alias).
template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB), aligned(sizeof(T)), may_alias));
  static constexpr int N = VB / sizeof(T);
};

// C[MR, NV*N] = A[MR, K] B[K, NV*N]: the C block stays in MR*NV registers; row-major with leading dimensions.
template <typename T, int VB, int MR, int NV>
ANISO_FAST_INLINE void gemm_block(int64_t K, const T* __restrict A, int64_t lda, const T* __restrict B, int64_t ldb,
                                  T* __restrict C, int64_t ldc) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::N;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const V*>(B + k * ldb + v * L);
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * lda + k];  // scalar * vector: a broadcast load (a `V{} + a` splat costs an add and a shuffle)
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(C + r * ldc + v * L) = acc[r][v];
}

// Rows of C per block: MR * NV accumulators, NV loads of B and one broadcast of A per step stay in the SIMD
// registers: 4 rows with 16 registers (AVX), 8 (16 for a single column vector) with 32 (AVX-512).
template <int VB, int NV>
constexpr int kRows = VB >= 64 ? (NV == 1 ? 16 : 8) : 4;

template <typename T, int VB, int NV>
ANISO_FAST_INLINE void gemm_columns(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                                    int64_t ldc) {
  constexpr int MR = kRows<VB, NV>;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) gemm_block<T, VB, MR, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
  if constexpr (MR > 8) {
    if (m + 8 <= M) {
      gemm_block<T, VB, 8, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
      m += 8;
    }
  }
  if constexpr (MR > 4) {
    if (m + 4 <= M) {
      gemm_block<T, VB, 4, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
      m += 4;
    }
  }
  for (; m < M; ++m) gemm_block<T, VB, 1, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
}

// C[M, N] = A[M, K] B[K, N], row-major: the small products of one channel image (sizes up to a few dozen).
template <typename T, int VB>
ANISO_FAST_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                            int64_t ldc) {
  constexpr int L = Vec<T, VB>::N;
  int64_t n = 0;
  for (; n + 2 * L <= N; n += 2 * L) gemm_columns<T, VB, 2>(M, K, A, lda, B + n, ldb, C + n, ldc);
  if (n + L <= N) {
    gemm_columns<T, VB, 1>(M, K, A, lda, B + n, ldb, C + n, ldc);
    n += L;
  }
  if (n < N) {  // the last few columns
    for (int64_t m = 0; m < M; ++m) {
      T* c = C + m * ldc + n;
      std::fill(c, c + (N - n), T(0));
      for (int64_t k = 0; k < K; ++k) axpy(c, A[m * lda + k], B + k * ldb + n, N - n);
    }
  }
}

// <x, y> over n elements, accumulated in 8 independent lanes (vectorisable without -ffast-math), returned in double.
template <typename scalar_t, typename acc_t>
ANISO_FAST_INLINE double dot_lanes(const scalar_t* __restrict x, const scalar_t* __restrict y, int64_t n) {
  acc_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lane[l] += static_cast<acc_t>(x[i + l]) * static_cast<acc_t>(y[i + l]);
  double s = 0;
  for (int l = 0; l < 8; ++l) s += lane[l];
  for (; i < n; ++i) s += static_cast<acc_t>(x[i]) * static_cast<acc_t>(y[i]);
  return s;
}

// sum_n m[n] x[n] y[n] over n elements: the products in acc_t (m is 0 or 1, so m x y is exactly x y or 0), summed
// in 8 independent double lanes (vectorisable without -ffast-math).
template <typename acc_t>
ANISO_FAST_INLINE double masked_dot(const acc_t* __restrict m, const acc_t* __restrict x, const acc_t* __restrict y,
                                    int64_t n) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lane[l] += static_cast<double>(m[i + l] * (x[i + l] * y[i + l]));
  double s = 0;
  for (int l = 0; l < 8; ++l) s += lane[l];
  for (; i < n; ++i) s += static_cast<double>(m[i] * (x[i] * y[i]));
  return s;
}

// Column counts of the scratch matrices are padded to this many elements (zero columns), so every product runs
// whole SIMD vectors: 28x28 images with a 14x14 block would otherwise spend ~40% of the time in scalar tails.
constexpr int64_t kPad = 8;
inline int64_t padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// The part of a separable basis that is not complement: active rows of CH (hr of h) and of CW (wc of w).
template <typename acc_t>
struct SeparablePlan {
  int64_t H = 0, W = 0, hr = 0, wc = 0, K = 1;
  int64_t wcp = 0, Wp = 0;       // wc and W padded to whole vectors
  std::vector<acc_t> ch;         // [hr, H] active rows of CH
  std::vector<acc_t> cw;         // [wcp, Wp] active rows of CW (zero padding)
  std::vector<acc_t> cwt;        // [W, wcp] their transpose (zero padding)
  std::vector<acc_t> cht;        // [H, hr] transpose of ch
  std::vector<int64_t> label;    // [hr, wcp] band restricted to the active box; padding is labelled K-1
  std::vector<acc_t> onehot;     // [K-1, hr * wcp]: 1 where label == k (dot's per-band sums as vector passes)

  SeparablePlan(const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band, int64_t K_) : K(K_) {
    const int64_t h = CH.size(0), w = CW.size(0);
    H = CH.size(1);
    W = CW.size(1);
    const int64_t* bd = band.data_ptr<int64_t>();
    std::vector<int64_t> rows, cols;
    for (int64_t p = 0; p < h; ++p)
      for (int64_t q = 0; q < w; ++q)
        if (bd[p * w + q] < K - 1) {
          rows.push_back(p);
          break;
        }
    for (int64_t q = 0; q < w; ++q)
      for (int64_t p = 0; p < h; ++p)
        if (bd[p * w + q] < K - 1) {
          cols.push_back(q);
          break;
        }
    hr = static_cast<int64_t>(rows.size());
    wc = static_cast<int64_t>(cols.size());
    wcp = padded(wc);
    Wp = padded(W);
    const acc_t* chd = CH.data_ptr<acc_t>();
    const acc_t* cwd = CW.data_ptr<acc_t>();
    ch.resize(hr * H);
    cw.assign(wcp * Wp, acc_t(0));
    cwt.assign(W * wcp, acc_t(0));
    cht.resize(H * hr);
    label.assign(hr * wcp, K - 1);
    for (int64_t p = 0; p < hr; ++p)
      for (int64_t i = 0; i < H; ++i) {
        ch[p * H + i] = chd[rows[p] * H + i];
        cht[i * hr + p] = chd[rows[p] * H + i];
      }
    for (int64_t q = 0; q < wc; ++q)
      for (int64_t j = 0; j < W; ++j) {
        cw[q * Wp + j] = cwd[cols[q] * W + j];
        cwt[j * wcp + q] = cwd[cols[q] * W + j];
      }
    for (int64_t p = 0; p < hr; ++p)
      for (int64_t q = 0; q < wc; ++q) label[p * wcp + q] = bd[rows[p] * w + cols[q]];
    onehot.assign((K - 1) * hr * wcp, acc_t(0));
    for (int64_t n = 0; n < hr * wcp; ++n)
      if (label[n] < K - 1) onehot[label[n] * hr * wcp + n] = acc_t(1);
  }

  // Y [hr, wcp] = CH_active X CW_active^T for one channel image X [H, W] (padding columns 0); Xc [H, W]
  // (fp16/bf16 upcast) and T [H, wcp] are scratch.
  template <int VB, typename scalar_t>
  ANISO_FAST_INLINE void analyse(const scalar_t* __restrict X, acc_t* __restrict Xc, acc_t* __restrict T, acc_t* __restrict Y) const {
    const acc_t* x;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      x = X;
    } else {
      for (int64_t n = 0; n < H * W; ++n) Xc[n] = static_cast<acc_t>(X[n]);
      x = Xc;
    }
    gemm<acc_t, VB>(H, wcp, W, x, W, cwt.data(), wcp, T, wcp);
    gemm<acc_t, VB>(hr, wcp, H, ch.data(), H, T, wcp, Y, wcp);
  }

  // Z [H, Wp] = CH_active^T coef CW_active for coefficients coef [hr, wcp] (columns past W are 0); S [hr, Wp] is
  // scratch.
  template <int VB>
  ANISO_FAST_INLINE void synthesise(const acc_t* __restrict coef, acc_t* __restrict S, acc_t* __restrict Z) const {
    gemm<acc_t, VB>(hr, Wp, wcp, coef, wcp, cw.data(), Wp, S, Wp);
    gemm<acc_t, VB>(H, Wp, hr, cht.data(), hr, S, Wp, Z, Wp);
  }
};

// Per-coefficient weight of label k: s[k] - s[K-1] (0 for the complement, whose scalar multiplies the image).
template <typename acc_t>
ANISO_FAST_INLINE void relative_weights(const acc_t* s, int64_t K, acc_t* rel) {
  for (int64_t k = 0; k < K - 1; ++k) rel[k] = s[k] - s[K - 1];
  rel[K - 1] = 0;
}

// Items per parallel task so that each task has at least ~64K multiply-adds: tiny calls (gradcheck sizes, small
// batches) then run inline instead of paying for a parallel region.
inline int64_t parallel_grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work_per_item));
}

// Everything one call needs, shared read-only by the tasks.
template <typename scalar_t, typename acc_t>
struct SeparableCall {
  const SeparablePlan<acc_t>& plan;
  int64_t C, K;
  const scalar_t *u, *v, *base;  // v, base may be null
  const acc_t *a, *c;            // c null when v is
  scalar_t* out;                 // combine: [B, C, H, W]
  acc_t* dot;                    // dot: [B, K]
};

// combine over channel images [begin, end); VB is the SIMD width in bytes the products are compiled for.
template <int VB, typename scalar_t, typename acc_t>
ANISO_FAST_INLINE void combine_images(const SeparableCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  const auto& plan = call.plan;
  const int64_t C = call.C, K = call.K, H = plan.H, W = plan.W, hr = plan.hr, HW = H * W;
  const int64_t wcp = plan.wcp, Wp = plan.Wp;
  std::vector<acc_t> Xc(std::is_same_v<scalar_t, acc_t> ? 0 : HW), T(H * wcp), Yu(hr * wcp),
      Yv(call.v ? hr * wcp : 0), S(hr * Wp), Z(H * Wp, acc_t(0)), ra(K), rc(K);
  for (int64_t img = begin; img < end; ++img) {
    const int64_t b = img / C;
    const scalar_t* x = call.u + img * HW;
    const scalar_t* y = call.v ? call.v + img * HW : nullptr;
    const scalar_t* bs = call.base ? call.base + img * HW : nullptr;
    scalar_t* o = call.out + img * HW;
    const acc_t al = call.a[b * K + K - 1];
    const acc_t cl = y ? call.c[b * K + K - 1] : acc_t(0);
    if (hr > 0) {  // Z = sum_{k<K-1} P_k ((a_k - a_last) x + (c_k - c_last) y); Z stays 0 when hr == 0
      relative_weights(call.a + b * K, K, ra.data());
      plan.template analyse<VB>(x, Xc.data(), T.data(), Yu.data());
      for (int64_t n = 0; n < hr * wcp; ++n) Yu[n] *= ra[plan.label[n]];
      if (y) {
        relative_weights(call.c + b * K, K, rc.data());
        plan.template analyse<VB>(y, Xc.data(), T.data(), Yv.data());
        for (int64_t n = 0; n < hr * wcp; ++n) Yu[n] += rc[plan.label[n]] * Yv[n];
      }
      plan.template synthesise<VB>(Yu.data(), S.data(), Z.data());
    }
    for (int64_t i = 0; i < H; ++i) {  // the complement terms, fused with the single write, row by row
      const acc_t* z = Z.data() + i * Wp;
      const int64_t r0 = i * W;
      if (y && bs) {
        for (int64_t n = r0; n < r0 + W; ++n)
          o[n] = static_cast<scalar_t>(z[n - r0] + al * static_cast<acc_t>(x[n]) + cl * static_cast<acc_t>(y[n]) +
                                       static_cast<acc_t>(bs[n]));
      } else if (y) {
        for (int64_t n = r0; n < r0 + W; ++n)
          o[n] = static_cast<scalar_t>(z[n - r0] + al * static_cast<acc_t>(x[n]) + cl * static_cast<acc_t>(y[n]));
      } else if (bs) {
        for (int64_t n = r0; n < r0 + W; ++n)
          o[n] = static_cast<scalar_t>(z[n - r0] + al * static_cast<acc_t>(x[n]) + static_cast<acc_t>(bs[n]));
      } else {
        for (int64_t n = r0; n < r0 + W; ++n) o[n] = static_cast<scalar_t>(z[n - r0] + al * static_cast<acc_t>(x[n]));
      }
    }
  }
}

// dot over samples [begin, end): per-band sums of coefficient products; the complement is <u, v> minus the rest.
template <int VB, typename scalar_t, typename acc_t>
ANISO_FAST_INLINE void dot_samples(const SeparableCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  const auto& plan = call.plan;
  const int64_t C = call.C, K = call.K, H = plan.H, W = plan.W, hr = plan.hr, wcp = plan.wcp, HW = H * W;
  const bool same = call.u == call.v;  // dot(x, x): one analysis per channel
  std::vector<acc_t> Xc(std::is_same_v<scalar_t, acc_t> ? 0 : HW), T(H * wcp), Yu(hr * wcp), Yv(same ? 0 : hr * wcp);
  std::vector<double> acc(K);
  for (int64_t b = begin; b < end; ++b) {
    std::fill(acc.begin(), acc.end(), 0.0);
    double total = 0;
    for (int64_t ch = 0; ch < C; ++ch) {
      const scalar_t* x = call.u + (b * C + ch) * HW;
      const scalar_t* y = call.v + (b * C + ch) * HW;
      total += dot_lanes<scalar_t, acc_t>(x, y, HW);
      if (hr == 0) continue;
      plan.template analyse<VB>(x, Xc.data(), T.data(), Yu.data());
      const acc_t* yv = Yu.data();
      if (!same) {
        plan.template analyse<VB>(y, Xc.data(), T.data(), Yv.data());
        yv = Yv.data();
      }
      for (int64_t k = 0; k < K - 1; ++k)  // per band: one vector pass (a scatter by label is a serial chain)
        acc[k] += masked_dot(plan.onehot.data() + k * hr * wcp, Yu.data(), yv, hr * wcp);
    }
    double rest = total;
    for (int64_t k = 0; k < K - 1; ++k) {
      call.dot[b * K + k] = static_cast<acc_t>(acc[k]);
      rest -= acc[k];
    }
    call.dot[b * K + K - 1] = static_cast<acc_t>(rest);
  }
}

// Everything one block_combine call needs: B [B, K, 2, 2]; base_x / base_v may be null.
template <typename scalar_t, typename acc_t>
struct SeparableBlockCall {
  const SeparablePlan<acc_t>& plan;
  int64_t C, K;
  const scalar_t *x, *v, *base_x, *base_v;
  const acc_t* B;
  scalar_t *out_x, *out_v;
};

// One output row of the block over an image: o = z + l0 x + l1 y (+ base), written once.
template <typename scalar_t, typename acc_t>
ANISO_FAST_INLINE void block_epilogue(const acc_t* __restrict Z, int64_t H, int64_t W, int64_t Wp, acc_t l0, acc_t l1,
                                      const scalar_t* __restrict x, const scalar_t* __restrict y,
                                      const scalar_t* __restrict bs, scalar_t* __restrict o) {
  for (int64_t i = 0; i < H; ++i) {
    const acc_t* z = Z + i * Wp;
    const int64_t r0 = i * W;
    if (bs) {
      for (int64_t n = r0; n < r0 + W; ++n)
        o[n] = static_cast<scalar_t>(z[n - r0] + l0 * static_cast<acc_t>(x[n]) + l1 * static_cast<acc_t>(y[n]) +
                                     static_cast<acc_t>(bs[n]));
    } else {
      for (int64_t n = r0; n < r0 + W; ++n)
        o[n] = static_cast<scalar_t>(z[n - r0] + l0 * static_cast<acc_t>(x[n]) + l1 * static_cast<acc_t>(y[n]));
    }
  }
}

// block_combine over channel images [begin, end): x and v are analysed once, their coefficients mixed in place by
// the relative blocks B_k - B_{K-1}, then synthesised one output at a time into the same scratch Z.
template <int VB, typename scalar_t, typename acc_t>
ANISO_FAST_INLINE void block_images(const SeparableBlockCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  const auto& plan = call.plan;
  const int64_t C = call.C, K = call.K, H = plan.H, W = plan.W, hr = plan.hr, HW = H * W;
  const int64_t wcp = plan.wcp, Wp = plan.Wp;
  std::vector<acc_t> Xc(std::is_same_v<scalar_t, acc_t> ? 0 : HW), T(H * wcp), Yx(hr * wcp), Yv(hr * wcp),
      S(hr * Wp), Z(H * Wp, acc_t(0)), rel(4 * K);
  for (int64_t img = begin; img < end; ++img) {
    const int64_t b = img / C;
    const scalar_t* x = call.x + img * HW;
    const scalar_t* y = call.v + img * HW;
    const acc_t* Bb = call.B + b * K * 4;
    const acc_t* last = Bb + (K - 1) * 4;
    if (hr > 0) {
      for (int64_t k = 0; k < K; ++k)  // rel[k * 4 + ij] = B[k, ij] - B[K-1, ij] (0 for the complement)
        for (int ij = 0; ij < 4; ++ij) rel[k * 4 + ij] = k == K - 1 ? acc_t(0) : Bb[k * 4 + ij] - last[ij];
      plan.template analyse<VB>(x, Xc.data(), T.data(), Yx.data());
      plan.template analyse<VB>(y, Xc.data(), T.data(), Yv.data());
      for (int64_t n = 0; n < hr * wcp; ++n) {
        const acc_t* r = rel.data() + plan.label[n] * 4;
        const acc_t cx = Yx[n], cv = Yv[n];
        Yx[n] = r[0] * cx + r[1] * cv;
        Yv[n] = r[2] * cx + r[3] * cv;
      }
      plan.template synthesise<VB>(Yx.data(), S.data(), Z.data());
    }
    block_epilogue(Z.data(), H, W, Wp, last[0], last[1], x, y, call.base_x ? call.base_x + img * HW : nullptr,
                   call.out_x + img * HW);
    if (hr > 0) plan.template synthesise<VB>(Yv.data(), S.data(), Z.data());
    block_epilogue(Z.data(), H, W, Wp, last[2], last[3], x, y, call.base_v ? call.base_v + img * HW : nullptr,
                   call.out_v + img * HW);
  }
}

template <typename scalar_t, typename acc_t>
ANISO_FAST_AVX512 void block_images_avx512(const SeparableBlockCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  block_images<64>(call, begin, end);
}
template <typename scalar_t, typename acc_t>
ANISO_FAST_AVX void block_images_avx(const SeparableBlockCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  block_images<32>(call, begin, end);
}
template <typename scalar_t, typename acc_t>
void block_images_base(const SeparableBlockCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  block_images<16>(call, begin, end);
}

template <typename scalar_t, typename acc_t>
ANISO_FAST_AVX512 void combine_images_avx512(const SeparableCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  combine_images<64>(call, begin, end);
}
template <typename scalar_t, typename acc_t>
ANISO_FAST_AVX void combine_images_avx(const SeparableCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  combine_images<32>(call, begin, end);
}
template <typename scalar_t, typename acc_t>
void combine_images_base(const SeparableCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  combine_images<16>(call, begin, end);
}
template <typename scalar_t, typename acc_t>
ANISO_FAST_AVX512 void dot_samples_avx512(const SeparableCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  dot_samples<64>(call, begin, end);
}
template <typename scalar_t, typename acc_t>
ANISO_FAST_AVX void dot_samples_avx(const SeparableCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  dot_samples<32>(call, begin, end);
}
template <typename scalar_t, typename acc_t>
void dot_samples_base(const SeparableCall<scalar_t, acc_t>& call, int64_t begin, int64_t end) {
  dot_samples<16>(call, begin, end);
}

template <typename scalar_t, typename acc_t>
void separable_combine_kernel(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                              const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                              const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band, at::Tensor& out) {
  const int64_t K = a.size(1);
  const SeparablePlan<acc_t> plan(CH, CW, band, K);
  const SeparableCall<scalar_t, acc_t> call{
      plan, u.size(1), K, u.data_ptr<scalar_t>(), v.has_value() ? v->data_ptr<scalar_t>() : nullptr,
      base.has_value() ? base->data_ptr<scalar_t>() : nullptr, a.data_ptr<acc_t>(),
      v.has_value() ? c->data_ptr<acc_t>() : nullptr, out.data_ptr<scalar_t>(), nullptr};
  const Isa isa = best_isa();
  const int64_t grain = parallel_grain(plan.H * plan.W * (plan.hr + plan.wc + 1));
  at::parallel_for(0, u.size(0) * u.size(1), grain, [&](int64_t begin, int64_t end) {
    if (isa == Isa::kAvx512) combine_images_avx512(call, begin, end);
    else if (isa == Isa::kAvx) combine_images_avx(call, begin, end);
    else combine_images_base(call, begin, end);
  });
}

template <typename scalar_t, typename acc_t>
void separable_dot_kernel(const at::Tensor& u, const at::Tensor& v, const at::Tensor& CH, const at::Tensor& CW,
                          const at::Tensor& band, int64_t K, at::Tensor& out) {
  const SeparablePlan<acc_t> plan(CH, CW, band, K);
  const SeparableCall<scalar_t, acc_t> call{
      plan, u.size(1), K, u.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), nullptr, nullptr, nullptr, nullptr,
      out.data_ptr<acc_t>()};
  const Isa isa = best_isa();
  const int64_t grain = parallel_grain(u.size(1) * plan.H * plan.W * (plan.hr + plan.wc + 1));
  at::parallel_for(0, u.size(0), grain, [&](int64_t begin, int64_t end) {
    if (isa == Isa::kAvx512) dot_samples_avx512(call, begin, end);
    else if (isa == Isa::kAvx) dot_samples_avx(call, begin, end);
    else dot_samples_base(call, begin, end);
  });
}

template <typename scalar_t, typename acc_t>
void separable_block_kernel(const at::Tensor& x, const at::Tensor& v, const at::Tensor& B,
                            const c10::optional<at::Tensor>& base_x, const c10::optional<at::Tensor>& base_v,
                            const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band, at::Tensor& out_x,
                            at::Tensor& out_v) {
  const int64_t K = B.size(1);
  const SeparablePlan<acc_t> plan(CH, CW, band, K);
  const SeparableBlockCall<scalar_t, acc_t> call{
      plan, x.size(1), K, x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
      base_x.has_value() ? base_x->data_ptr<scalar_t>() : nullptr,
      base_v.has_value() ? base_v->data_ptr<scalar_t>() : nullptr, B.data_ptr<acc_t>(), out_x.data_ptr<scalar_t>(),
      out_v.data_ptr<scalar_t>()};
  const Isa isa = best_isa();
  const int64_t grain = parallel_grain(2 * plan.H * plan.W * (plan.hr + plan.wc + 1));
  at::parallel_for(0, x.size(0) * x.size(1), grain, [&](int64_t begin, int64_t end) {
    if (isa == Isa::kAvx512) block_images_avx512(call, begin, end);
    else if (isa == Isa::kAvx) block_images_avx(call, begin, end);
    else block_images_base(call, begin, end);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> separable_block_combine_cpu(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& B, const c10::optional<at::Tensor>& base_x,
    const c10::optional<at::Tensor>& base_v, const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band) {
  at::Tensor out_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor out_v = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "separable_block_combine_cpu", [&] {
    separable_block_kernel<scalar_t, at::opmath_type<scalar_t>>(x, v, B, base_x, base_v, CH, CW, band, out_x, out_v);
  });
  return {out_x, out_v};
}

at::Tensor separable_combine_cpu(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                                 const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                                 const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band) {
  at::Tensor out = at::empty_like(u, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "separable_combine_cpu", [&] {
    separable_combine_kernel<scalar_t, at::opmath_type<scalar_t>>(u, a, v, c, base, CH, CW, band, out);
  });
  return out;
}

at::Tensor separable_dot_cpu(const at::Tensor& u, const at::Tensor& v, const at::Tensor& CH, const at::Tensor& CW,
                             const at::Tensor& band, int64_t K) {
  const auto acc_type = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({u.size(0), K}, u.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "separable_dot_cpu", [&] {
    separable_dot_kernel<scalar_t, at::opmath_type<scalar_t>>(u, v, CH, CW, band, K, out);
  });
  return out;
}
