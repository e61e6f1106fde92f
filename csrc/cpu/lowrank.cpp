// Low-rank (PCA) subspace ops on CPU: combine and dot (docs/DESIGN.md, "The subspace op contract").
//
// A "unit" is one row the basis acts on: a channel image (spatial basis, d == H*W) or a whole image (joint basis,
// d == C*H*W). Samples are ordered by group id (stable argsort, computed here) and cut into tiles of a few samples
// sharing one id, so a tile streams each row of V[id] once for all its units while it sits in cache. Only the
// functionals labelled below K-1 are touched; the complement's scalar multiplies the whole unit.
#include "../subspace.h"
#include "isa.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace {

#define ANISO_FAST_INLINE inline __attribute__((always_inline))

constexpr int64_t kUnitsPerBlock = 8;   // units sharing each pass over a row of V[id]
constexpr int64_t kSynthesisChunk = 256;  // columns of V per synthesis pass (the block's accumulators stay in L1)

template <typename acc_t>
ANISO_FAST_INLINE void axpy(acc_t* __restrict y, acc_t alpha, const acc_t* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// <x, y> in 8 independent lanes (vectorisable without -ffast-math).
template <typename acc_t, typename xs_t, typename ys_t>
ANISO_FAST_INLINE acc_t dot_lanes(const xs_t* __restrict x, const ys_t* __restrict y, int64_t n) {
  acc_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lane[l] += static_cast<acc_t>(x[i + l]) * static_cast<acc_t>(y[i + l]);
  acc_t s = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
  for (; i < n; ++i) s += static_cast<acc_t>(x[i]) * static_cast<acc_t>(y[i]);
  return s;
}

template <typename acc_t>
ANISO_FAST_INLINE void relative_weights(const acc_t* s, int64_t K, acc_t* rel) {
  for (int64_t k = 0; k < K - 1; ++k) rel[k] = s[k] - s[K - 1];
  rel[K - 1] = 0;
}

template <typename Body>
ANISO_FAST_AVX void run_avx(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}
template <typename Body>
void run_base(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}

// Layout of a low-rank call: units, active functionals and the id-sorted tiles of samples.
struct LowrankPlan {
  int64_t B = 0, rows = 1, d = 0, r = 0, K = 1;
  std::vector<int64_t> active;  // functionals labelled below K-1
  std::vector<int64_t> label;   // their labels
  std::vector<int64_t> order;   // samples, stably sorted by id
  std::vector<int64_t> tile;    // tile t holds order[tile[t] .. tile[t+1])
  std::vector<int64_t> tile_id;

  LowrankPlan(const at::Tensor& u, const at::Tensor& V, const at::Tensor& vband,
              const c10::optional<at::Tensor>& ids, int64_t K_) : K(K_) {
    B = u.size(0);
    r = V.size(1);
    d = V.size(2);
    rows = d == u.size(2) * u.size(3) ? u.size(1) : 1;
    const int64_t* vb = vband.data_ptr<int64_t>();
    for (int64_t j = 0; j < r; ++j)
      if (vb[j] < K - 1) {
        active.push_back(j);
        label.push_back(vb[j]);
      }
    order.resize(B);
    std::iota(order.begin(), order.end(), int64_t(0));
    const int64_t* id = ids.has_value() ? ids->data_ptr<int64_t>() : nullptr;
    if (id) std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return id[i] < id[j]; });
    const int64_t per_tile = std::max<int64_t>(1, kUnitsPerBlock / rows);
    for (int64_t s = 0; s < B;) {
      const int64_t g = id ? id[order[s]] : 0;
      int64_t e = s + 1;
      while (e < B && e - s < per_tile && (id ? id[order[e]] : 0) == g) ++e;
      tile.push_back(s);
      tile_id.push_back(g);
      s = e;
    }
    tile.push_back(B);
  }
  int64_t tiles() const { return static_cast<int64_t>(tile_id.size()); }
  // Tiles per parallel task so that each task has at least ~64K multiply-adds (tiny calls run inline).
  int64_t grain() const {
    const int64_t work = std::max<int64_t>(1, kUnitsPerBlock * d * (static_cast<int64_t>(active.size()) + 1));
    return std::max<int64_t>(1, (int64_t(1) << 16) / work);
  }
};

template <typename Body>
void run_tiles(const Body& body, const LowrankPlan& plan) {
  const bool avx = cpu_has_avx_fma();
  at::parallel_for(0, plan.tiles(), plan.grain(), [&](int64_t begin, int64_t end) {
    avx ? run_avx(body, begin, end) : run_base(body, begin, end);
  });
}

template <typename scalar_t, typename acc_t>
void lowrank_combine_kernel(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                            const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                            const at::Tensor& V, const at::Tensor& vband, const c10::optional<at::Tensor>& ids,
                            at::Tensor& out) {
  const int64_t K = a.size(1);
  const LowrankPlan plan(u, V, vband, ids, K);
  const int64_t d = plan.d, r = plan.r, rows = plan.rows, ra = static_cast<int64_t>(plan.active.size());
  const scalar_t* ud = u.data_ptr<scalar_t>();
  const scalar_t* vd = v.has_value() ? v->data_ptr<scalar_t>() : nullptr;
  const scalar_t* bd = base.has_value() ? base->data_ptr<scalar_t>() : nullptr;
  const acc_t* ad = a.data_ptr<acc_t>();
  const acc_t* cd = vd ? c->data_ptr<acc_t>() : nullptr;
  const acc_t* Vd = V.data_ptr<acc_t>();
  scalar_t* od = out.data_ptr<scalar_t>();

  const auto body = [&](int64_t begin, int64_t end) __attribute__((always_inline)) {
    std::vector<int64_t> unit(kUnitsPerBlock);
    std::vector<acc_t> coef(kUnitsPerBlock * ra), acc(kUnitsPerBlock * kSynthesisChunk), rel(K);
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* Vg = Vd + plan.tile_id[t] * r * d;
      const int64_t n_units = (plan.tile[t + 1] - plan.tile[t]) * rows;
      for (int64_t u0 = 0; u0 < n_units; u0 += kUnitsPerBlock) {
        const int64_t nu = std::min(kUnitsPerBlock, n_units - u0);
        for (int64_t i = 0; i < nu; ++i) {
          const int64_t k = u0 + i;
          unit[i] = plan.order[plan.tile[t] + k / rows] * rows + k % rows;
        }
        // analysis and weighting: coef[i, j] = (a_l - a_last) <V_j, u_i> + (c_l - c_last) <V_j, v_i>
        for (int64_t i = 0; i < nu; ++i) {
          const int64_t b = unit[i] / rows;
          relative_weights(ad + b * K, K, rel.data());
          for (int64_t j = 0; j < ra; ++j)
            coef[i * ra + j] = rel[plan.label[j]] * dot_lanes<acc_t>(Vg + plan.active[j] * d, ud + unit[i] * d, d);
          if (vd) {
            relative_weights(cd + b * K, K, rel.data());
            for (int64_t j = 0; j < ra; ++j)
              coef[i * ra + j] +=
                  rel[plan.label[j]] * dot_lanes<acc_t>(Vg + plan.active[j] * d, vd + unit[i] * d, d);
          }
        }
        // synthesis chunk by chunk, fused with the complement terms and the single write
        for (int64_t d0 = 0; d0 < d; d0 += kSynthesisChunk) {
          const int64_t len = std::min(kSynthesisChunk, d - d0);
          std::fill(acc.begin(), acc.begin() + nu * kSynthesisChunk, acc_t(0));
          for (int64_t j = 0; j < ra; ++j) {
            const acc_t* vrow = Vg + plan.active[j] * d + d0;
            for (int64_t i = 0; i < nu; ++i) axpy(acc.data() + i * kSynthesisChunk, coef[i * ra + j], vrow, len);
          }
          for (int64_t i = 0; i < nu; ++i) {
            const int64_t b = unit[i] / rows, off = unit[i] * d + d0;
            const acc_t al = ad[b * K + K - 1], cl = vd ? cd[b * K + K - 1] : acc_t(0);
            const acc_t* z = acc.data() + i * kSynthesisChunk;
            const scalar_t* x = ud + off;
            scalar_t* o = od + off;
            if (vd && bd) {
              for (int64_t n = 0; n < len; ++n)
                o[n] = static_cast<scalar_t>(z[n] + al * static_cast<acc_t>(x[n]) +
                                             cl * static_cast<acc_t>(vd[off + n]) + static_cast<acc_t>(bd[off + n]));
            } else if (vd) {
              for (int64_t n = 0; n < len; ++n)
                o[n] = static_cast<scalar_t>(z[n] + al * static_cast<acc_t>(x[n]) +
                                             cl * static_cast<acc_t>(vd[off + n]));
            } else if (bd) {
              for (int64_t n = 0; n < len; ++n)
                o[n] = static_cast<scalar_t>(z[n] + al * static_cast<acc_t>(x[n]) + static_cast<acc_t>(bd[off + n]));
            } else {
              for (int64_t n = 0; n < len; ++n) o[n] = static_cast<scalar_t>(z[n] + al * static_cast<acc_t>(x[n]));
            }
          }
        }
      }
    }
  };
  run_tiles(body, plan);
}

template <typename scalar_t, typename acc_t>
void lowrank_dot_kernel(const at::Tensor& u, const at::Tensor& v, const at::Tensor& V, const at::Tensor& vband,
                        const c10::optional<at::Tensor>& ids, int64_t K, at::Tensor& out) {
  const LowrankPlan plan(u, V, vband, ids, K);
  const int64_t d = plan.d, r = plan.r, rows = plan.rows, ra = static_cast<int64_t>(plan.active.size());
  const scalar_t* ud = u.data_ptr<scalar_t>();
  const scalar_t* vd = v.data_ptr<scalar_t>();
  const bool same = ud == vd;  // dot(x, x): one analysis per unit
  const acc_t* Vd = V.data_ptr<acc_t>();
  acc_t* od = out.data_ptr<acc_t>();

  const auto body = [&](int64_t begin, int64_t end) __attribute__((always_inline)) {
    std::vector<double> acc(K);
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* Vg = Vd + plan.tile_id[t] * r * d;
      for (int64_t s = plan.tile[t]; s < plan.tile[t + 1]; ++s) {
        const int64_t b = plan.order[s];
        std::fill(acc.begin(), acc.end(), 0.0);
        double total = 0;
        for (int64_t row = 0; row < rows; ++row) {
          const scalar_t* x = ud + (b * rows + row) * d;
          const scalar_t* y = vd + (b * rows + row) * d;
          total += dot_lanes<acc_t>(x, y, d);
          for (int64_t j = 0; j < ra; ++j) {
            const acc_t* vrow = Vg + plan.active[j] * d;
            const acc_t zu = dot_lanes<acc_t>(vrow, x, d);
            acc[plan.label[j]] += static_cast<double>(zu * (same ? zu : dot_lanes<acc_t>(vrow, y, d)));
          }
        }
        double rest = total;
        for (int64_t k = 0; k < K - 1; ++k) {
          od[b * K + k] = static_cast<acc_t>(acc[k]);
          rest -= acc[k];
        }
        od[b * K + K - 1] = static_cast<acc_t>(rest);
      }
    }
  };
  run_tiles(body, plan);
}

}  // namespace

at::Tensor lowrank_combine_cpu(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                               const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                               const at::Tensor& V, const at::Tensor& vband, const c10::optional<at::Tensor>& ids) {
  at::Tensor out = at::empty_like(u, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "lowrank_combine_cpu", [&] {
    lowrank_combine_kernel<scalar_t, at::opmath_type<scalar_t>>(u, a, v, c, base, V, vband, ids, out);
  });
  return out;
}

at::Tensor lowrank_dot_cpu(const at::Tensor& u, const at::Tensor& v, const at::Tensor& V, const at::Tensor& vband,
                           const c10::optional<at::Tensor>& ids, int64_t K) {
  const auto acc_type = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({u.size(0), K}, u.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "lowrank_dot_cpu", [&] {
    lowrank_dot_kernel<scalar_t, at::opmath_type<scalar_t>>(u, v, V, vband, ids, K, out);
  });
  return out;
}
