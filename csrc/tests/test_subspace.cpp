// Native test of the CPU kernels (run by ctest): projector identities on a small separable (DCT) basis and a
// low-rank (QR) basis, spatial and joint, through combine (one-hot scalars) and dot. Exit status 0 on success.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>

#include "subspace.h"

namespace {

int failures = 0;

void expect_close(const at::Tensor& x, const at::Tensor& y, double tol, const std::string& what) {
  const double err = (x - y).abs().max().item<double>();
  std::printf("%-60s max error %.3g\n", what.c_str(), err);
  if (!(err <= tol)) {
    std::printf("  FAILED: tolerance %.3g\n", tol);
    ++failures;
  }
}

at::Tensor dct_matrix(int64_t n) {  // orthonormal DCT-II, C[u, x] = alpha_u cos((2x+1) u pi / (2n))
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  const auto x = at::arange(n, opt);
  auto C = at::cos((2 * x.unsqueeze(0) + 1) * x.unsqueeze(1) * M_PI / (2.0 * n)) * std::sqrt(2.0 / n);
  C[0] /= std::sqrt(2.0);
  return C;
}

using Combine = std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>;
using Dot = std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>;

// P_k^2 = P_k, sum_k P_k = I, P_j P_k = 0, dot(x, x) = per-subspace squared norms summing to ||x||^2.
void check_projectors(const Combine& combine, const Dot& dot, const at::Tensor& x, int64_t K,
                      const std::string& name) {
  const int64_t B = x.size(0);
  const auto eye = at::eye(K, x.options());
  auto sum = at::zeros_like(x);
  std::vector<at::Tensor> parts;
  for (int64_t k = 0; k < K; ++k) {
    const auto ek = eye[k].expand({B, K}).contiguous();
    const auto p = combine(x, ek);
    expect_close(combine(p, ek), p, 1e-12, name + ": P_" + std::to_string(k) + "^2 = P_" + std::to_string(k));
    for (int64_t j = 0; j < k; ++j)
      expect_close(combine(parts[j], ek), at::zeros_like(x), 1e-12,
                   name + ": P_" + std::to_string(k) + " P_" + std::to_string(j) + " = 0");
    parts.push_back(p);
    sum += p;
  }
  expect_close(sum, x, 1e-12, name + ": sum_k P_k = I");
  const auto norms = dot(x, x);
  expect_close(norms.sum(1), x.flatten(1).pow(2).sum(1), 1e-10, name + ": sum_k dot(x, x)_k = ||x||^2");
  for (int64_t k = 0; k < K; ++k)
    expect_close(norms.select(1, k), parts[k].flatten(1).pow(2).sum(1), 1e-10,
                 name + ": dot(x, x)_" + std::to_string(k) + " = ||P_k x||^2");
}

}  // namespace

int main() {
  at::manual_seed(0);
  const int64_t B = 3, C = 2, H = 8, W = 12, K = 3;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const auto x = at::randn({B, C, H, W}, f64);

  const auto CH = dct_matrix(H).slice(0, 0, 5).contiguous(), CW = dct_matrix(W).slice(0, 0, 7).contiguous();
  const auto band = at::randint(0, K, {5, 7}, i64);
  check_projectors(
      [&](const at::Tensor& u, const at::Tensor& a) {
        return separable_combine_cpu(u, a, c10::nullopt, c10::nullopt, c10::nullopt, CH, CW, band);
      },
      [&](const at::Tensor& u, const at::Tensor& v) { return separable_dot_cpu(u, v, CH, CW, band, K); }, x, K,
      "separable 8x12, 5x7 box");

  for (const int64_t d : {H * W, C * H * W}) {
    const int64_t G = 3, r = 9;
    const auto V = std::get<0>(at::linalg_qr(at::randn({G, d, r}, f64))).transpose(1, 2).contiguous();
    const auto vband = at::randint(0, K, {r}, i64);
    const auto ids = at::tensor(std::vector<int64_t>{2, 0, 2}, i64);
    const std::string name = d == H * W ? "low-rank spatial, per-sample ids" : "low-rank joint, per-sample ids";
    check_projectors(
        [&](const at::Tensor& u, const at::Tensor& a) {
          return lowrank_combine_cpu(u, a, c10::nullopt, c10::nullopt, c10::nullopt, V, vband, ids);
        },
        [&](const at::Tensor& u, const at::Tensor& v) { return lowrank_dot_cpu(u, v, V, vband, ids, K); }, x, K,
        name);
  }

  // fused form: base + P(a u + c v) equals the sum of its parts, in fp32 against fp64
  const auto u32 = x.to(at::kFloat), v32 = at::randn({B, C, H, W}), base32 = at::randn({B, C, H, W});
  const auto a32 = at::randn({B, K}), c32 = at::randn({B, K});
  const auto fused = separable_combine_cpu(u32, a32, v32, c32, base32, CH.to(at::kFloat), CW.to(at::kFloat), band);
  const auto parts = separable_combine_cpu(x, a32.to(at::kDouble), c10::nullopt, c10::nullopt, c10::nullopt, CH,
                                           CW, band) +
                     separable_combine_cpu(v32.to(at::kDouble), c32.to(at::kDouble), c10::nullopt, c10::nullopt,
                                           c10::nullopt, CH, CW, band) +
                     base32.to(at::kDouble);
  expect_close(fused.to(at::kDouble), parts, 1e-5, "separable fused fp32 = sum of fp64 parts");

  // block_combine (op 3): each output equals one combine with a row of the 2x2 blocks as (a, c)
  const auto Bk = at::randn({B, K, 2, 2}, f64);
  const auto vv = v32.to(at::kDouble), bx = base32.to(at::kDouble);
  const auto row = [&](int64_t i, int64_t j) { return Bk.select(2, i).select(2, j).contiguous(); };
  const auto sep_block = separable_block_combine_cpu(x, vv, Bk, bx, c10::nullopt, CH, CW, band);
  expect_close(std::get<0>(sep_block), separable_combine_cpu(x, row(0, 0), vv, row(0, 1), bx, CH, CW, band), 1e-12,
               "separable block_combine x' = combine(x, B00, v, B01, base_x)");
  expect_close(std::get<1>(sep_block),
               separable_combine_cpu(x, row(1, 0), vv, row(1, 1), c10::nullopt, CH, CW, band), 1e-12,
               "separable block_combine v' = combine(x, B10, v, B11)");
  {
    const auto V = std::get<0>(at::linalg_qr(at::randn({2, H * W, 9}, f64))).transpose(1, 2).contiguous();
    const auto vband = at::randint(0, K, {9}, i64);
    const auto ids = at::tensor(std::vector<int64_t>{1, 0, 1}, i64);
    const auto low_block = lowrank_block_combine_cpu(x, vv, Bk, c10::nullopt, bx, V, vband, ids);
    expect_close(std::get<0>(low_block),
                 lowrank_combine_cpu(x, row(0, 0), vv, row(0, 1), c10::nullopt, V, vband, ids), 1e-12,
                 "low-rank block_combine x' = combine(x, B00, v, B01)");
    expect_close(std::get<1>(low_block), lowrank_combine_cpu(x, row(1, 0), vv, row(1, 1), bx, V, vband, ids), 1e-12,
                 "low-rank block_combine v' = combine(x, B10, v, B11, base_v)");
  }

  std::printf(failures ? "%d check(s) FAILED\n" : "all checks passed\n", failures);
  return failures ? 1 : 0;
}
