// Elementwise parts of a decoder layer on float32 rows: RMSNorm (alone, and fused with the residual
// add before it) and the gated MLP's activation-and-multiply (SiLU or tanh GELU).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <string>

#include "simd.h"

namespace leanserve {

// f(offset, vector) over n floats: whole vectors, then the tail as a partial one.
template <typename F>
inline void for_vectors(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + simd::kLanes <= n; i += simd::kLanes) f(i, simd::kLanes);
  if (i < n) f(i, static_cast<int>(n - i));
}

inline simd::Vec load_n(const float* p, int n) { return n == simd::kLanes ? simd::load(p) : simd::load_partial(p, n); }
inline void store_n(float* p, simd::Vec x, int n) {
  if (n == simd::kLanes) simd::store(p, x);
  else simd::store_partial(p, x, n);
}

// out = r * rsqrt(mean(r^2) + eps) * weight for one row of `hidden` values.
inline void norm_row(const float* r, const float* weight, float* out, int64_t hidden, float eps) {
  simd::Vec squares = simd::zero();
  for_vectors(hidden, [&](int64_t i, int n) {
    const simd::Vec x = load_n(r + i, n);
    squares = simd::fmadd(x, x, squares);
  });
  const simd::Vec inverse = simd::set1(1.f / std::sqrt(simd::reduce_add(squares) / hidden + eps));
  for_vectors(hidden, [&](int64_t i, int n) {
    store_n(out + i, simd::mul(simd::mul(load_n(r + i, n), inverse), load_n(weight + i, n)), n);
  });
}

inline void check_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "contiguous rows [.., H] and a weight [H]");
}

// RMSNorm of float32 rows x [T, H].
inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  at::Tensor out = at::empty_like(x);
  const int64_t hidden = weight.size(0), rows = x.numel() / hidden;
  const float *xd = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(xd + r * hidden, w, od + r * hidden, hidden, static_cast<float>(eps));
  });
  return out;
}

// In place: residual += x, then x = RMSNorm(residual): a layer's residual add and the next norm in one pass.
inline void add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  check_rows(residual, weight);
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual differ in shape");
  const int64_t hidden = weight.size(0), rows = x.numel() / hidden;
  float *xd = x.data_ptr<float>(), *rd = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float *xr = xd + r * hidden, *rr = rd + r * hidden;
      for_vectors(hidden, [&](int64_t i, int n) { store_n(rr + i, simd::add(load_n(rr + i, n), load_n(xr + i, n)), n); });
      norm_row(rr, w, xr, hidden, static_cast<float>(eps));
    }
  });
}

// The gated MLP's activation: SwiGLU's SiLU, or GeGLU's tanh-approximated GELU (HF gelu_pytorch_tanh).
enum class Activation { silu, gelu_tanh };

inline Activation activation_named(const std::string& name) {
  if (name == "silu") return Activation::silu;
  TORCH_CHECK(name == "gelu_tanh", "activation must be silu or gelu_tanh, not ", name);
  return Activation::gelu_tanh;
}

// Both activations are x sigmoid(z) = x / (1 + exp(-z)): SiLU's z = x; the tanh GELU's
// 0.5 x (1 + tanh(u)) equals x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), a form that keeps its
// relative accuracy where 1 + tanh(u) would cancel (x << 0).
template <Activation A>
inline simd::Vec activate(simd::Vec x) {
  simd::Vec z = x;
  if constexpr (A == Activation::gelu_tanh) {
    constexpr float two_root_2_over_pi = 1.5957691216057308f;
    const simd::Vec x3 = simd::mul(simd::mul(x, x), x);
    z = simd::mul(simd::set1(two_root_2_over_pi), simd::fmadd(simd::set1(0.044715f), x3, x));
  }
  return simd::div(x, simd::add(simd::set1(1.f), simd::exp(simd::sub(simd::zero(), z))));
}

// gate_up [T, 2 I] float32 -> act(gate) * up [T, I].
template <Activation A>
inline at::Tensor gated(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
              "gate_up must be float32 [T, 2 I]");
  const at::Tensor x = gate_up.contiguous();
  const int64_t rows = x.size(0), width = x.size(1) / 2;
  at::Tensor out = at::empty({rows, width}, at::kFloat);
  const float* xd = x.data_ptr<float>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = xd + r * 2 * width;
      const float* up = gate + width;
      for_vectors(width, [&](int64_t i, int n) {
        store_n(od + r * width + i, simd::mul(activate<A>(load_n(gate + i, n)), load_n(up + i, n)), n);
      });
    }
  });
  return out;
}

inline at::Tensor gated(Activation activation, const at::Tensor& gate_up) {
  return activation == Activation::silu ? gated<Activation::silu>(gate_up) : gated<Activation::gelu_tanh>(gate_up);
}

}  // namespace leanserve
