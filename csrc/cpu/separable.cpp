// Separable (DCT) subspace ops on CPU: combine and dot (docs/DESIGN.md, "The subspace op contract").
//
// One task per channel image (combine) or per sample (dot). Per image the truncated transform Y = CH X CW^T is
// kept in a small per-thread scratch between analysis, weighting and synthesis, and the output is written once.
// Only the rows of CH and columns of CW that carry a label below K-1 are touched: the rest feeds the complement,
// whose scalar is applied to the whole image (P_{K-1} = I - sum_{k<K-1} P_k). All inner loops are axpy's over a
// contiguous row, so the compiler vectorises them without reassociating a reduction.
#include "../subspace.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

template <typename acc_t>
inline void axpy(acc_t* __restrict y, acc_t alpha, const acc_t* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// <x, y> over n elements, accumulated in 8 independent lanes (vectorisable without -ffast-math), returned in double.
template <typename scalar_t, typename acc_t>
inline double dot_lanes(const scalar_t* __restrict x, const scalar_t* __restrict y, int64_t n) {
  acc_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lane[l] += static_cast<acc_t>(x[i + l]) * static_cast<acc_t>(y[i + l]);
  double s = 0;
  for (int l = 0; l < 8; ++l) s += lane[l];
  for (; i < n; ++i) s += static_cast<acc_t>(x[i]) * static_cast<acc_t>(y[i]);
  return s;
}

// The part of a separable basis that is not complement: active rows of CH (hr of h) and of CW (wc of w).
template <typename acc_t>
struct SeparablePlan {
  int64_t H = 0, W = 0, hr = 0, wc = 0, K = 1;
  std::vector<acc_t> ch;         // [hr, H] active rows of CH
  std::vector<acc_t> cw;         // [wc, W] active rows of CW
  std::vector<acc_t> cwt;        // [W, wc] their transpose (analysis is an axpy over the active columns)
  std::vector<int64_t> label;    // [hr, wc] band restricted to the active box

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
    const acc_t* chd = CH.data_ptr<acc_t>();
    const acc_t* cwd = CW.data_ptr<acc_t>();
    ch.resize(hr * H);
    cw.resize(wc * W);
    cwt.resize(W * wc);
    label.resize(hr * wc);
    for (int64_t p = 0; p < hr; ++p) std::copy(chd + rows[p] * H, chd + (rows[p] + 1) * H, ch.begin() + p * H);
    for (int64_t q = 0; q < wc; ++q)
      for (int64_t j = 0; j < W; ++j) {
        cw[q * W + j] = cwd[cols[q] * W + j];
        cwt[j * wc + q] = cwd[cols[q] * W + j];
      }
    for (int64_t p = 0; p < hr; ++p)
      for (int64_t q = 0; q < wc; ++q) label[p * wc + q] = bd[rows[p] * w + cols[q]];
  }

  // Y [hr, wc] = CH_active X CW_active^T for one channel image X [H, W]; T [H, wc] is scratch.
  template <typename scalar_t>
  void analyse(const scalar_t* __restrict X, acc_t* __restrict T, acc_t* __restrict Y) const {
    for (int64_t i = 0; i < H; ++i) {
      acc_t* trow = T + i * wc;
      std::fill(trow, trow + wc, acc_t(0));
      for (int64_t j = 0; j < W; ++j) axpy(trow, static_cast<acc_t>(X[i * W + j]), cwt.data() + j * wc, wc);
    }
    for (int64_t p = 0; p < hr; ++p) {
      acc_t* yrow = Y + p * wc;
      std::fill(yrow, yrow + wc, acc_t(0));
      for (int64_t i = 0; i < H; ++i) axpy(yrow, ch[p * H + i], T + i * wc, wc);
    }
  }
};

// Per-coefficient weight of label k: s[k] - s[K-1] (0 for the complement, whose scalar multiplies the image).
template <typename acc_t>
inline void relative_weights(const acc_t* s, int64_t K, acc_t* rel) {
  for (int64_t k = 0; k < K - 1; ++k) rel[k] = s[k] - s[K - 1];
  rel[K - 1] = 0;
}

template <typename scalar_t, typename acc_t>
void separable_combine_kernel(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                              const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                              const at::Tensor& CH, const at::Tensor& CW, const at::Tensor& band, at::Tensor& out) {
  const int64_t B = u.size(0), C = u.size(1), K = a.size(1);
  const SeparablePlan<acc_t> plan(CH, CW, band, K);
  const int64_t H = plan.H, W = plan.W, hr = plan.hr, wc = plan.wc, HW = H * W;
  const scalar_t* ud = u.data_ptr<scalar_t>();
  const scalar_t* vd = v.has_value() ? v->data_ptr<scalar_t>() : nullptr;
  const scalar_t* bd = base.has_value() ? base->data_ptr<scalar_t>() : nullptr;
  const acc_t* ad = a.data_ptr<acc_t>();
  const acc_t* cd = vd ? c->data_ptr<acc_t>() : nullptr;
  scalar_t* od = out.data_ptr<scalar_t>();

  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> T(H * wc), Yu(hr * wc), Yv(vd ? hr * wc : 0), S(hr * W), z(W), ra(K), rc(K);
    for (int64_t img = begin; img < end; ++img) {
      const int64_t b = img / C;
      const scalar_t* x = ud + img * HW;
      const scalar_t* y = vd ? vd + img * HW : nullptr;
      const scalar_t* bs = bd ? bd + img * HW : nullptr;
      scalar_t* o = od + img * HW;
      const acc_t al = ad[b * K + K - 1];
      const acc_t cl = vd ? cd[b * K + K - 1] : acc_t(0);
      if (hr > 0) {
        relative_weights(ad + b * K, K, ra.data());
        plan.analyse(x, T.data(), Yu.data());
        for (int64_t n = 0; n < hr * wc; ++n) Yu[n] *= ra[plan.label[n]];
        if (vd) {
          relative_weights(cd + b * K, K, rc.data());
          plan.analyse(y, T.data(), Yv.data());
          for (int64_t n = 0; n < hr * wc; ++n) Yu[n] += rc[plan.label[n]] * Yv[n];
        }
        for (int64_t p = 0; p < hr; ++p) {  // S = coeff CW_active
          acc_t* srow = S.data() + p * W;
          std::fill(srow, srow + W, acc_t(0));
          for (int64_t q = 0; q < wc; ++q) axpy(srow, Yu[p * wc + q], plan.cw.data() + q * W, W);
        }
      }
      for (int64_t i = 0; i < H; ++i) {  // row i of CH_active^T S, fused with the complement terms and the write
        std::fill(z.begin(), z.end(), acc_t(0));
        for (int64_t p = 0; p < hr; ++p) axpy(z.data(), plan.ch[p * H + i], S.data() + p * W, W);
        const int64_t r0 = i * W;
        if (y && bs) {
          for (int64_t j = 0; j < W; ++j)
            o[r0 + j] = static_cast<scalar_t>(z[j] + al * static_cast<acc_t>(x[r0 + j]) +
                                              cl * static_cast<acc_t>(y[r0 + j]) + static_cast<acc_t>(bs[r0 + j]));
        } else if (y) {
          for (int64_t j = 0; j < W; ++j)
            o[r0 + j] = static_cast<scalar_t>(z[j] + al * static_cast<acc_t>(x[r0 + j]) +
                                              cl * static_cast<acc_t>(y[r0 + j]));
        } else if (bs) {
          for (int64_t j = 0; j < W; ++j)
            o[r0 + j] = static_cast<scalar_t>(z[j] + al * static_cast<acc_t>(x[r0 + j]) +
                                              static_cast<acc_t>(bs[r0 + j]));
        } else {
          for (int64_t j = 0; j < W; ++j)
            o[r0 + j] = static_cast<scalar_t>(z[j] + al * static_cast<acc_t>(x[r0 + j]));
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void separable_dot_kernel(const at::Tensor& u, const at::Tensor& v, const at::Tensor& CH, const at::Tensor& CW,
                          const at::Tensor& band, int64_t K, at::Tensor& out) {
  const int64_t B = u.size(0), C = u.size(1);
  const SeparablePlan<acc_t> plan(CH, CW, band, K);
  const int64_t H = plan.H, W = plan.W, hr = plan.hr, wc = plan.wc, HW = H * W;
  const scalar_t* ud = u.data_ptr<scalar_t>();
  const scalar_t* vd = v.data_ptr<scalar_t>();
  const bool same = ud == vd;  // dot(x, x): one analysis per channel
  acc_t* od = out.data_ptr<acc_t>();

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> T(H * wc), Yu(hr * wc), Yv(same ? 0 : hr * wc);
    std::vector<double> acc(K);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0);
      double total = 0;
      for (int64_t ch = 0; ch < C; ++ch) {
        const scalar_t* x = ud + (b * C + ch) * HW;
        const scalar_t* y = vd + (b * C + ch) * HW;
        total += dot_lanes<scalar_t, acc_t>(x, y, HW);
        if (hr == 0) continue;
        plan.analyse(x, T.data(), Yu.data());
        const acc_t* yv = Yu.data();
        if (!same) {
          plan.analyse(y, T.data(), Yv.data());
          yv = Yv.data();
        }
        for (int64_t n = 0; n < hr * wc; ++n) acc[plan.label[n]] += static_cast<double>(Yu[n] * yv[n]);
      }
      double rest = total;
      for (int64_t k = 0; k < K - 1; ++k) {
        od[b * K + k] = static_cast<acc_t>(acc[k]);
        rest -= acc[k];
      }
      od[b * K + K - 1] = static_cast<acc_t>(rest);
    }
  });
}

}  // namespace

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
