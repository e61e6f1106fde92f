// Low-rank (PCA) subspace ops on CPU: combine, dot and block_combine (docs/DESIGN.md, "The subspace op contract").
//
// A "unit" is one row the basis acts on: a channel image (spatial basis, d == H*W) or a whole image (joint basis,
// d == C*H*W). Samples are stably sorted by group id (here) and cut into tiles of whole samples sharing one id.
// Per tile, the analysis `Z = X V[id]^T` and the synthesis `Z V[id]` are BLAS GEMMs on views (at::mm_out), so
// V[id] streams once per tile rather than once per unit; the per-sample weights, the complement terms and the
// single write to the output are fused around them. Tiles whose samples are consecutive in memory and already in
// the compute dtype are read and written in place; others go through tile buffers, so the scratch is bounded by
// the tile size, never by the batch.
//
// How the tiles are cut and run (the rule is LowrankPlan's constructor, the one place that chooses). A BLAS GEMM
// packs its V operand on every call, so a tile should be tall enough to amortise that; a parallel region costs
// little on a quiet machine but a scheduler time slice on a loaded one, so the fewer the better.
//  - One basis for the whole batch, images in place (the global basis, fp32 / fp64): the fewest tiles, of up to
//    kBigTileUnits units. If V[id] is over kSharedBasisBytes (it does not stay in a core's cache, e.g. 64x64 images
//    with r = 1024: 16 MiB), the tiles are *shared*: they run one after another, each GEMM on all threads (BLAS
//    threads it and packs V once for all of them) and each row loop split among the threads. Otherwise they run
//    *per thread*, as many as the threads (one parallel region per call).
//  - Otherwise (class-conditional bases, or images to convert): per-thread tiles of about kTileUnits units, each
//    run of equal ids cut evenly, as many as the threads can share evenly (one parallel region; tile buffers stay
//    small). Shared tiles measured the same here on a quiet machine (64x64 class bases, 2 threads) and cost one
//    parallel region per GEMM and row loop of every class.
// Per-thread tiles of 64 units against one big basis re-packed V a dozen times per call: the fused op was then
// slower than the plain one-einsum composition (0.83x at 64x64x3, B = 256, bench/RESULTS.md before issue 24).
#include "../subspace.h"
#include "isa.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

#define ANISO_FAST_INLINE inline __attribute__((always_inline))

constexpr int64_t kTileUnits = 64;      // class-conditional tiles: rows of one GEMM (at most, about)
constexpr int64_t kBigTileUnits = 1024;  // one-basis tiles: rows of one GEMM at most (scratch: this many rows of r)
constexpr int64_t kSharedBasisBytes = int64_t(4) << 20;  // a basis above this: shared tiles

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

template <typename Body>
ANISO_FAST_AVX void run_avx(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}
template <typename Body>
void run_base(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}
template <typename Body>
ANISO_FAST_INLINE void run_isa(bool avx, const Body& body, int64_t begin, int64_t end) {
  avx ? run_avx(body, begin, end) : run_base(body, begin, end);
}

// Layout of a low-rank call: units, the labels of V's rows and the id-sorted tiles of samples.
struct LowrankPlan {
  int64_t B = 0, rows = 1, d = 0, r = 0, K = 1, max_units = 0;
  bool shared = false;          // the tiles run one after another, each on all threads (see the file comment)
  std::vector<int64_t> label;   // label of each row of V
  std::vector<int64_t> order;   // samples, stably sorted by id
  std::vector<int64_t> tile;    // tile t holds order[tile[t] .. tile[t+1])
  std::vector<int64_t> tile_id;
  std::vector<char> consecutive;  // tile t's samples are order[tile[t]] + 0, 1, 2, ...

  // in_place: the images are in the compute dtype (then a run of consecutive samples is used in place).
  LowrankPlan(const at::Tensor& u, const at::Tensor& V, const at::Tensor& vband,
              const c10::optional<at::Tensor>& ids, int64_t K_, bool in_place) : K(K_) {
    B = u.size(0);
    r = V.size(1);
    d = V.size(2);
    rows = d == u.size(2) * u.size(3) ? u.size(1) : 1;
    const int64_t* vb = vband.data_ptr<int64_t>();
    label.assign(vb, vb + r);
    order.resize(B);
    std::iota(order.begin(), order.end(), int64_t(0));
    const int64_t* id = ids.has_value() ? ids->data_ptr<int64_t>() : nullptr;
    if (id) std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return id[i] < id[j]; });
    // The rule (see the file comment): big tiles for one basis in place, shared when that basis is large.
    const bool big = in_place && B > 0 && (!id || id[order[0]] == id[order[B - 1]]);
    shared = big && r * d * static_cast<int64_t>(V.element_size()) > kSharedBasisBytes;
    const int64_t cap = big ? kBigTileUnits : kTileUnits;
    int64_t total = (B * rows + cap - 1) / cap;
    if (!shared) {
      // Tiles split each run of equal ids evenly, and their number is a multiple of the thread count when there
      // is enough work to share: 3 tiles on 2 threads would leave one thread idle for a third of the call.
      const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
      if (B * rows * d * r >= (int64_t(1) << 20)) total = std::max(total, threads);
      total = (total + threads - 1) / threads * threads;
    }
    for (int64_t s = 0; s < B;) {  // one run of equal ids: order[s .. e)
      const int64_t g = id ? id[order[s]] : 0;
      int64_t e = s + 1;
      while (e < B && (id ? id[order[e]] : 0) == g) ++e;
      const int64_t m = e - s;
      const int64_t n_tiles = std::min(m, std::max<int64_t>(1, (total * m + B / 2) / B));
      for (int64_t k = 0; k < n_tiles; ++k) {  // tile k: samples s + [k m / n, (k+1) m / n)
        const int64_t t0 = s + k * m / n_tiles, t1 = s + (k + 1) * m / n_tiles;
        bool run = true;
        for (int64_t i = t0 + 1; i < t1; ++i) run = run && order[i] == order[i - 1] + 1;
        tile.push_back(t0);
        tile_id.push_back(g);
        consecutive.push_back(run);
        max_units = std::max(max_units, (t1 - t0) * rows);
      }
      s = e;
    }
    tile.push_back(B);
  }
  int64_t tiles() const { return static_cast<int64_t>(tile_id.size()); }
  int64_t units(int64_t t) const { return (tile[t + 1] - tile[t]) * rows; }
  int64_t first_unit(int64_t t) const { return order[tile[t]] * rows; }
  // unit i of tile t -> its row in the [B * rows, d] view of the images
  int64_t unit(int64_t t, int64_t i) const { return order[tile[t] + i / rows] * rows + i % rows; }
  // Tiles per parallel task: at least ~2^20 multiply-adds, so tiny calls run inline (and BLAS may thread them).
  int64_t grain() const {
    const int64_t work = std::max<int64_t>(1, max_units * d * r);
    return std::max<int64_t>(1, (int64_t(1) << 20) / work);
  }
};

// Runs a tile's row loop f(i0, i1) over its units [0, n): inline on the tile's thread (per-thread tiles), or split
// among the threads (shared tiles; then each part is compiled for the ISA here).
struct RowLoop {
  bool shared, avx;
  int64_t grain;
  template <typename F>
  ANISO_FAST_INLINE void operator()(int64_t n, const F& f) const {
    if (!shared) {
      f(0, n);
      return;
    }
    at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) { run_isa(avx, f, i0, i1); });
  }
};

// Runs tile(t, scratch, row_loop) for every tile of the plan, per thread or shared (see the file comment). Scratch
// is default-constructed once per thread (per-thread tiles) or once (shared tiles).
template <typename Scratch, typename Tile>
void run_tiles(const Tile& tile, const LowrankPlan& plan) {
  const bool avx = cpu_has_avx_fma();
  if (plan.shared) {
    // row loops of at least ~2^16 elements per part
    const RowLoop loop{true, avx, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, plan.d))};
    Scratch scratch;
    for (int64_t t = 0; t < plan.tiles(); ++t) tile(t, scratch, loop);
    return;
  }
  const RowLoop loop{false, avx, 1};
  at::parallel_for(0, plan.tiles(), plan.grain(), [&](int64_t begin, int64_t end) {
    run_isa(avx, [&](int64_t b, int64_t e) __attribute__((always_inline)) {
      Scratch scratch;
      for (int64_t t = b; t < e; ++t) tile(t, scratch, loop);
    }, begin, end);
  });
}

// A tile buffer of [plan.max_units, cols] in the compute dtype (allocated on first use), seen as a tensor.
template <typename acc_t>
struct TileBuffer {
  std::vector<acc_t> data;
  at::Tensor rows(const LowrankPlan& plan, int64_t n, int64_t cols, const at::TensorOptions& opts) {
    if (data.empty()) data.resize(plan.max_units * cols);
    return at::from_blob(data.data(), {n, cols}, opts);
  }
};

// The tile's units as a [n, d] matrix in the compute dtype: a view of `data` when they are consecutive and of that
// dtype already, else gathered (and converted) into `buffer` by the tile's row loop.
template <typename scalar_t, typename acc_t>
ANISO_FAST_INLINE at::Tensor tile_rows(const scalar_t* data, const LowrankPlan& plan, int64_t t,
                                       TileBuffer<acc_t>& buffer, const at::TensorOptions& opts, const RowLoop& loop) {
  const int64_t n = plan.units(t), d = plan.d;
  if (std::is_same<scalar_t, acc_t>::value && plan.consecutive[t])
    return at::from_blob(const_cast<scalar_t*>(data) + plan.first_unit(t) * d, {n, d}, opts);
  at::Tensor rows = buffer.rows(plan, n, d, opts);
  acc_t* dst = rows.data_ptr<acc_t>();
  loop(n, [&](int64_t i0, int64_t i1) __attribute__((always_inline)) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* src = data + plan.unit(t, i) * d;
      for (int64_t k = 0; k < d; ++k) dst[i * d + k] = static_cast<acc_t>(src[k]);
    }
  });
  return rows;
}

template <typename scalar_t, typename acc_t>
void lowrank_combine_kernel(const at::Tensor& u, const at::Tensor& a, const c10::optional<at::Tensor>& v,
                            const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& base,
                            const at::Tensor& V, const at::Tensor& vband, const c10::optional<at::Tensor>& ids,
                            at::Tensor& out) {
  const int64_t K = a.size(1);
  const LowrankPlan plan(u, V, vband, ids, K, std::is_same<scalar_t, acc_t>::value);
  const int64_t d = plan.d, r = plan.r, rows = plan.rows;
  const scalar_t* ud = u.data_ptr<scalar_t>();
  const scalar_t* vd = v.has_value() ? v->data_ptr<scalar_t>() : nullptr;
  const scalar_t* bd = base.has_value() ? base->data_ptr<scalar_t>() : nullptr;
  const acc_t* ad = a.data_ptr<acc_t>();
  const acc_t* cd = vd ? c->data_ptr<acc_t>() : nullptr;
  scalar_t* od = out.data_ptr<scalar_t>();
  const auto opts = V.options();

  struct Scratch {
    TileBuffer<acc_t> xbuf, ybuf, obuf, zu, zv;  // x/y/o: only for tiles that cannot be used in place
  };
  const auto tile = [&](int64_t t, Scratch& s, const RowLoop& loop) __attribute__((always_inline)) {
    const int64_t n = plan.units(t);
    const at::Tensor Vg = V.select(0, plan.tile_id[t]);
    at::Tensor Zu = s.zu.rows(plan, n, r, opts), Zv = vd ? s.zv.rows(plan, n, r, opts) : at::Tensor();
    at::mm_out(Zu, tile_rows<scalar_t, acc_t>(ud, plan, t, s.xbuf, opts, loop), Vg.t());  // analysis
    if (vd) at::mm_out(Zv, tile_rows<scalar_t, acc_t>(vd, plan, t, s.ybuf, opts, loop), Vg.t());
    // weighting: coef[i, j] = (a_l - a_last) <V_j, u_i> + (c_l - c_last) <V_j, v_i>, l the label of row j
    acc_t* zu_d = Zu.data_ptr<acc_t>();
    const acc_t* zv_d = vd ? Zv.data_ptr<acc_t>() : nullptr;
    loop(n, [&](int64_t i0, int64_t i1) __attribute__((always_inline)) {
      std::vector<acc_t> rel_a(K), rel_c(K);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = plan.unit(t, i) / rows;
        for (int64_t k = 0; k < K; ++k) rel_a[k] = ad[b * K + k] - ad[b * K + K - 1];
        if (vd)
          for (int64_t k = 0; k < K; ++k) rel_c[k] = cd[b * K + k] - cd[b * K + K - 1];
        acc_t* z = zu_d + i * r;
        if (vd) {
          const acc_t* w = zv_d + i * r;
          for (int64_t j = 0; j < r; ++j) z[j] = rel_a[plan.label[j]] * z[j] + rel_c[plan.label[j]] * w[j];
        } else {
          for (int64_t j = 0; j < r; ++j) z[j] *= rel_a[plan.label[j]];
        }
      }
    });
    // synthesis, straight into the output when it is laid out as the tile
    const bool direct = std::is_same<scalar_t, acc_t>::value && plan.consecutive[t];
    at::Tensor O = direct ? at::from_blob(od + plan.first_unit(t) * d, {n, d}, opts) : s.obuf.rows(plan, n, d, opts);
    at::mm_out(O, Zu, Vg);
    // epilogue: the complement terms and the base, one write per element
    const acc_t* o_d = O.data_ptr<acc_t>();
    loop(n, [&](int64_t i0, int64_t i1) __attribute__((always_inline)) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = plan.unit(t, i), b = row / rows, off = row * d;
        const acc_t al = ad[b * K + K - 1], cl = vd ? cd[b * K + K - 1] : acc_t(0);
        const acc_t* z = o_d + i * d;
        const scalar_t* x = ud + off;
        scalar_t* o = od + off;
        if (vd && bd) {
          for (int64_t k = 0; k < d; ++k)
            o[k] = static_cast<scalar_t>(z[k] + al * static_cast<acc_t>(x[k]) + cl * static_cast<acc_t>(vd[off + k]) +
                                         static_cast<acc_t>(bd[off + k]));
        } else if (vd) {
          for (int64_t k = 0; k < d; ++k)
            o[k] = static_cast<scalar_t>(z[k] + al * static_cast<acc_t>(x[k]) + cl * static_cast<acc_t>(vd[off + k]));
        } else if (bd) {
          for (int64_t k = 0; k < d; ++k)
            o[k] = static_cast<scalar_t>(z[k] + al * static_cast<acc_t>(x[k]) + static_cast<acc_t>(bd[off + k]));
        } else {
          for (int64_t k = 0; k < d; ++k) o[k] = static_cast<scalar_t>(z[k] + al * static_cast<acc_t>(x[k]));
        }
      }
    });
  };
  run_tiles<Scratch>(tile, plan);
}

// block_combine: per tile, one analysis of x and of v (two GEMMs), their coefficients mixed in place by the relative
// blocks B_k - B_{K-1}, then one synthesis GEMM and one epilogue per output.
template <typename scalar_t, typename acc_t>
void lowrank_block_kernel(const at::Tensor& x, const at::Tensor& v, const at::Tensor& B,
                          const c10::optional<at::Tensor>& base_x, const c10::optional<at::Tensor>& base_v,
                          const at::Tensor& V, const at::Tensor& vband, const c10::optional<at::Tensor>& ids,
                          at::Tensor& out_x, at::Tensor& out_v) {
  const int64_t K = B.size(1);
  const LowrankPlan plan(x, V, vband, ids, K, std::is_same<scalar_t, acc_t>::value);
  const int64_t d = plan.d, r = plan.r, rows = plan.rows;
  const scalar_t* xd = x.data_ptr<scalar_t>();
  const scalar_t* vd = v.data_ptr<scalar_t>();
  const scalar_t* bases[2] = {base_x.has_value() ? base_x->data_ptr<scalar_t>() : nullptr,
                              base_v.has_value() ? base_v->data_ptr<scalar_t>() : nullptr};
  scalar_t* outs[2] = {out_x.data_ptr<scalar_t>(), out_v.data_ptr<scalar_t>()};
  const acc_t* Bd = B.data_ptr<acc_t>();
  const auto opts = V.options();

  struct Scratch {
    TileBuffer<acc_t> xbuf, ybuf, obuf, zx, zv;  // x/y/o: only for tiles that cannot be used in place
  };
  const auto tile = [&](int64_t t, Scratch& s, const RowLoop& loop) __attribute__((always_inline)) {
    const int64_t n = plan.units(t);
    const at::Tensor Vg = V.select(0, plan.tile_id[t]);
    at::Tensor Z[2] = {s.zx.rows(plan, n, r, opts), s.zv.rows(plan, n, r, opts)};
    at::mm_out(Z[0], tile_rows<scalar_t, acc_t>(xd, plan, t, s.xbuf, opts, loop), Vg.t());  // analysis
    at::mm_out(Z[1], tile_rows<scalar_t, acc_t>(vd, plan, t, s.ybuf, opts, loop), Vg.t());
    // mixing: (zx, zv)[i, j] <- (B_l - B_last) (zx, zv)[i, j], l the label of row j
    acc_t* zx_d = Z[0].data_ptr<acc_t>();
    acc_t* zv_d = Z[1].data_ptr<acc_t>();
    loop(n, [&](int64_t i0, int64_t i1) __attribute__((always_inline)) {
      std::vector<acc_t> rel(4 * K);
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t* Bb = Bd + plan.unit(t, i) / rows * K * 4;
        for (int64_t k = 0; k < K; ++k)
          for (int ij = 0; ij < 4; ++ij) rel[k * 4 + ij] = Bb[k * 4 + ij] - Bb[(K - 1) * 4 + ij];
        for (int64_t j = 0; j < r; ++j) {
          const acc_t* m = rel.data() + plan.label[j] * 4;
          const acc_t cx = zx_d[i * r + j], cv = zv_d[i * r + j];
          zx_d[i * r + j] = m[0] * cx + m[1] * cv;
          zv_d[i * r + j] = m[2] * cx + m[3] * cv;
        }
      }
    });
    const bool direct = std::is_same<scalar_t, acc_t>::value && plan.consecutive[t];
    for (int out = 0; out < 2; ++out) {
      scalar_t* od = outs[out];
      const scalar_t* bd = bases[out];
      at::Tensor O = direct ? at::from_blob(od + plan.first_unit(t) * d, {n, d}, opts) : s.obuf.rows(plan, n, d, opts);
      at::mm_out(O, Z[out], Vg);  // synthesis, straight into the output when it is laid out as the tile
      const acc_t* o_d = O.data_ptr<acc_t>();
      loop(n, [&](int64_t i0, int64_t i1) __attribute__((always_inline)) {
        for (int64_t i = i0; i < i1; ++i) {  // epilogue: the complement's block row and the base, one write
          const int64_t row = plan.unit(t, i), off = row * d;
          const acc_t* last = Bd + (row / rows * K + K - 1) * 4 + 2 * out;
          const acc_t l0 = last[0], l1 = last[1];
          const acc_t* z = o_d + i * d;
          const scalar_t* xr = xd + off;
          const scalar_t* vr = vd + off;
          scalar_t* o = od + off;
          if (bd) {
            for (int64_t k = 0; k < d; ++k)
              o[k] = static_cast<scalar_t>(z[k] + l0 * static_cast<acc_t>(xr[k]) + l1 * static_cast<acc_t>(vr[k]) +
                                           static_cast<acc_t>(bd[off + k]));
          } else {
            for (int64_t k = 0; k < d; ++k)
              o[k] = static_cast<scalar_t>(z[k] + l0 * static_cast<acc_t>(xr[k]) + l1 * static_cast<acc_t>(vr[k]));
          }
        }
      });
    }
  };
  run_tiles<Scratch>(tile, plan);
}

template <typename scalar_t, typename acc_t>
void lowrank_dot_kernel(const at::Tensor& u, const at::Tensor& v, const at::Tensor& V, const at::Tensor& vband,
                        const c10::optional<at::Tensor>& ids, int64_t K, at::Tensor& out) {
  const LowrankPlan plan(u, V, vband, ids, K, std::is_same<scalar_t, acc_t>::value);
  const int64_t d = plan.d, r = plan.r, rows = plan.rows;
  const scalar_t* ud = u.data_ptr<scalar_t>();
  const scalar_t* vd = v.data_ptr<scalar_t>();
  const bool same = ud == vd;  // dot(x, x): one analysis per unit
  acc_t* od = out.data_ptr<acc_t>();
  const auto opts = V.options();

  struct Scratch {
    TileBuffer<acc_t> xbuf, ybuf, zu, zv;
  };
  const auto tile = [&](int64_t t, Scratch& s, const RowLoop& loop) __attribute__((always_inline)) {
    const int64_t n = plan.units(t);
    const at::Tensor Vg = V.select(0, plan.tile_id[t]);
    at::Tensor Zu = s.zu.rows(plan, n, r, opts);
    at::mm_out(Zu, tile_rows<scalar_t, acc_t>(ud, plan, t, s.xbuf, opts, loop), Vg.t());
    at::Tensor Zv = Zu;
    if (!same) {
      Zv = s.zv.rows(plan, n, r, opts);
      at::mm_out(Zv, tile_rows<scalar_t, acc_t>(vd, plan, t, s.ybuf, opts, loop), Vg.t());
    }
    const acc_t* zu_d = Zu.data_ptr<acc_t>();
    const acc_t* zv_d = Zv.data_ptr<acc_t>();
    // per sample (tiles hold whole samples): the row loop runs over the tile's samples
    loop(n / rows, [&](int64_t s0, int64_t s1) __attribute__((always_inline)) {
      std::vector<double> acc(K);
      for (int64_t q = s0; q < s1; ++q) {
        const int64_t b = plan.order[plan.tile[t] + q];
        std::fill(acc.begin(), acc.end(), 0.0);
        double total = 0;
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t i = q * rows + row;
          total += dot_lanes<acc_t>(ud + (b * rows + row) * d, vd + (b * rows + row) * d, d);
          for (int64_t j = 0; j < r; ++j)
            acc[plan.label[j]] += static_cast<double>(zu_d[i * r + j] * zv_d[i * r + j]);
        }
        double rest = total;  // the complement (and rows labelled K-1): the total minus the projected parts
        for (int64_t k = 0; k < K - 1; ++k) {
          od[b * K + k] = static_cast<acc_t>(acc[k]);
          rest -= acc[k];
        }
        od[b * K + K - 1] = static_cast<acc_t>(rest);
      }
    });
  };
  run_tiles<Scratch>(tile, plan);
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

std::tuple<at::Tensor, at::Tensor> lowrank_block_combine_cpu(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& B, const c10::optional<at::Tensor>& base_x,
    const c10::optional<at::Tensor>& base_v, const at::Tensor& V, const at::Tensor& vband,
    const c10::optional<at::Tensor>& ids) {
  at::Tensor out_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor out_v = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_block_combine_cpu", [&] {
    lowrank_block_kernel<scalar_t, at::opmath_type<scalar_t>>(x, v, B, base_x, base_v, V, vband, ids, out_x, out_v);
  });
  return {out_x, out_v};
}
