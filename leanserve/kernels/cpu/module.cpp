// The native CPU kernels' Python module, built once per ISA level by leanserve/kernels/cpu_kernels.py
// (the level follows from the compiler flags: simd.h).
#include <torch/extension.h>

#include "attention.h"
#include "executor.h"
#include "linear.h"
#include "ops.h"
#include "simd.h"

namespace py = pybind11;
using namespace leanserve;

namespace {

// Python's None for "none" of a layer's optional parts: an undefined tensor, a 0 window or soft-cap.
at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t ? t->contiguous() : at::Tensor(); }
template <typename N>
N or_zero(const std::optional<N>& x) { return x.value_or(N(0)); }

AttentionOptions attention_options(double scale, const std::optional<double>& softcap,
                                   const std::optional<int64_t>& window) {
  TORCH_CHECK(scale > 0 && or_zero(softcap) >= 0 && or_zero(window) >= 0, "a positive scale, soft-cap and window");
  return {static_cast<float>(scale), static_cast<float>(or_zero(softcap)), or_zero(window)};
}

// q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, >= blocks] and context_lens [B]
// int64 (each >= 1). Lean attention of each row over its context (its window's part of it); returns
// [B, H, D] float32.
at::Tensor checked_lean_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t tile,
                               double scale, const std::optional<double>& softcap,
                               const std::optional<int64_t>& window) {
  const AttentionOptions options = attention_options(scale, softcap, window);
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(2);
  check_cache(k_cache, v_cache, kv_heads, dim);
  TORCH_CHECK(q.dim() == 3 && heads % kv_heads == 0, "q must be [B, H, D] over the cache's heads");
  const at::Tensor tables = block_tables.to(at::kLong).contiguous(), lens = context_lens.to(at::kLong).contiguous();
  std::vector<int64_t> starts(batch), ones(batch, 1), contexts(lens.data_ptr<int64_t>(), lens.data_ptr<int64_t>() + batch);
  std::vector<std::vector<int64_t>> rows;
  for (int64_t b = 0; b < batch; ++b) {
    starts[b] = b;
    const int64_t* t = tables.data_ptr<int64_t>() + b * tables.size(1);
    rows.emplace_back(t, t + tables.size(1));
  }
  StepPlan plan(starts, ones, contexts, rows, at::zeros({batch}, at::kLong), k_cache.size(1), heads, kv_heads, tile,
                false, {options.window});
  const at::Tensor qf = (q.to(at::kFloat) * scale).contiguous();
  at::Tensor out = at::empty({batch, heads, dim}, at::kFloat);
  py::gil_scoped_release no_gil;
  with_cache_type(k_cache.scalar_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    lean_decode<T>(plan, options, qf.data_ptr<float>(), static_cast<const T*>(k_cache.data_ptr()),
                   static_cast<const T*>(v_cache.data_ptr()), dim, out.data_ptr<float>());
  });
  return out.to(q.scalar_type());
}

// q [T, H, D] float32 of the plan's rows; every key and value (the step's own too) already in the cache.
// Causal attention of all the plan's rows (its decode rows and prefill segments, as attention_step
// computes them): writes them into out [T, H, D].
void checked_paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, StepPlan& plan,
                               double scale, at::Tensor out, const std::optional<double>& softcap,
                               const std::optional<int64_t>& window) {
  const AttentionOptions options = attention_options(scale, softcap, window);
  check_cache(k_cache, v_cache, plan.kv_heads, q.size(2));
  TORCH_CHECK(q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == q.sizes() && q.size(1) == plan.heads, "float32 q and out [T, H, D]");
  const at::Tensor qf = (q * scale).contiguous();
  py::gil_scoped_release no_gil;
  with_cache_type(k_cache.scalar_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const T* kd = static_cast<const T*>(k_cache.data_ptr());
    const T* vd = static_cast<const T*>(v_cache.data_ptr());
    decode_attention<T>(plan, options, qf.data_ptr<float>(), kd, vd, q.size(2), out.data_ptr<float>());
    prefill_attention<T>(plan, options, qf.data_ptr<float>(), kd, vd, q.size(2), out.data_ptr<float>());
  });
}

// One layer's attention step (attention.h) with its options; qkv_bias [(H + 2 Hkv) D], q_norm and
// k_norm [D] or None.
at::Tensor checked_attention_step(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache, StepPlan& plan, double scale,
                                  const std::optional<double>& softcap, const std::optional<int64_t>& window,
                                  const std::optional<at::Tensor>& qkv_bias, const std::optional<at::Tensor>& q_norm,
                                  const std::optional<at::Tensor>& k_norm, double eps) {
  check_cache(k_cache, v_cache, plan.kv_heads, k_cache.size(3));
  const int64_t dim = k_cache.size(3), width = (plan.heads + 2 * plan.kv_heads) * dim;
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "float32 activations");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == width && plan.slots.size(0) == qkv.size(0),
              "qkv does not fit the plan and the cache's heads");
  const at::Tensor bias = or_undefined(qkv_bias), qn = or_undefined(q_norm), kn = or_undefined(k_norm);
  auto check = [](const at::Tensor& t, int64_t size) {
    TORCH_CHECK(!t.defined() || (t.scalar_type() == at::kFloat && t.numel() == size), "float32 [", size, "] expected");
  };
  check(bias, width);
  check(qn, dim);
  check(kn, dim);
  auto data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  const HeadPrep prep{data(bias), data(qn), data(kn), static_cast<float>(eps)};
  const AttentionOptions options = attention_options(scale, softcap, window);
  py::gil_scoped_release no_gil;
  return attention_step(qkv, cos, sin, k_cache, v_cache, plan, options, prep);
}

at::Tensor checked_quant_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_mins,
                                int64_t group, int64_t out_features) {
  py::gil_scoped_release no_gil;
  return quant_linear(x, packed, scales_mins, group, out_features);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ISA") = simd::kLevel;
  m.attr("LANES") = simd::kLanes;
  m.def("pack_int4", &pack_int4, "q uint8 [N, K] (0..15), scales, mins [N, K / G] -> (packed, scales_mins)",
        py::arg("q"), py::arg("scales"), py::arg("mins"));
  m.def("pack_int8", &pack_int8,
        "w int8 [N, K], scales [N, K / G], mins [N, K / G] or None (0) -> (packed, scales_mins)", py::arg("w"),
        py::arg("scales"), py::arg("mins") = py::none());
  m.def("quant_linear", &checked_quant_linear, "x [M, K] float32 times a packed weight -> [M, N]");
  m.def("rms_norm", &leanserve::rms_norm);
  m.def("add_rms_norm", [](at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
    add_rms_norm(x, residual, weight, eps);
  });
  m.def("silu_mul", &gated<Activation::silu>);
  m.def("gelu_tanh_mul", &gated<Activation::gelu_tanh>);
  m.def("lean_attention_decode", &checked_lean_decode, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("tile"), py::arg("scale"), py::kw_only(),
        py::arg("softcap") = py::none(), py::arg("window") = py::none());
  m.def("paged_attention", &checked_paged_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("plan"), py::arg("scale"), py::arg("out"), py::kw_only(), py::arg("softcap") = py::none(),
        py::arg("window") = py::none());
  m.def("attention_step", &checked_attention_step, py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("plan"), py::arg("scale"), py::kw_only(), py::arg("softcap") = py::none(),
        py::arg("window") = py::none(), py::arg("qkv_bias") = py::none(), py::arg("q_norm") = py::none(),
        py::arg("k_norm") = py::none(), py::arg("eps") = 1e-6);
  py::class_<StepPlan>(m, "StepPlan", py::module_local())
      .def(py::init<const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
                    const std::vector<std::vector<int64_t>>&, at::Tensor, int64_t, int64_t, int64_t, int64_t, bool,
                    const std::vector<int64_t>&>(),
           py::arg("query_starts"), py::arg("query_lens"), py::arg("context_lens"), py::arg("block_tables"),
           py::arg("slot_mapping"), py::arg("block_size"), py::arg("heads"), py::arg("kv_heads"), py::arg("tile"),
           py::arg("batch_invariant") = false, py::arg("windows") = std::vector<int64_t>{0})
      .def_property_readonly("num_tiles", [](const StepPlan& p) { return p.tile_sets.at(0).tiles.size(); })
      .def("num_tiles_of", [](const StepPlan& p, int64_t window) { return p.tiles_of(window).tiles.size(); },
           py::arg("window"))
      .def_property_readonly("num_prefill_items", [](const StepPlan& p) { return p.items.size(); })
      .def_property_readonly("num_decode_rows", [](const StepPlan& p) { return p.decode_rows.size(); });
  py::class_<Linear>(m, "Linear", py::module_local())
      .def_static("quantized", &Linear::quantized, py::arg("packed"), py::arg("scales_mins"), py::arg("group"),
                  py::arg("out_features"))
      .def_static("dense", &Linear::from_dense, py::arg("weight"))
      .def("__call__", &Linear::operator(), py::call_guard<py::gil_scoped_release>());
  py::class_<DecoderLayer>(m, "DecoderLayer", py::module_local())
      .def(py::init([](at::Tensor input_norm, at::Tensor post_attention_norm, Linear qkv, Linear o, Linear gate_up,
                       Linear down, at::Tensor k_cache, at::Tensor v_cache,
                       const std::optional<at::Tensor>& attn_output_norm,
                       const std::optional<at::Tensor>& mlp_output_norm, const std::optional<at::Tensor>& qkv_bias,
                       const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                       const std::optional<int64_t>& window, int64_t rope) {
             return DecoderLayer{input_norm.contiguous(), post_attention_norm.contiguous(),
                                 or_undefined(attn_output_norm), or_undefined(mlp_output_norm), qkv, o, gate_up, down,
                                 or_undefined(qkv_bias), or_undefined(q_norm), or_undefined(k_norm), or_zero(window),
                                 rope, k_cache, v_cache};
           }),
           py::arg("input_norm"), py::arg("post_attention_norm"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"), py::arg("k_cache"), py::arg("v_cache"), py::kw_only(),
           py::arg("attn_output_norm") = py::none(), py::arg("mlp_output_norm") = py::none(),
           py::arg("qkv_bias") = py::none(), py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none(),
           py::arg("window") = py::none(), py::arg("rope") = 0);
  py::class_<Executor>(m, "Executor", py::module_local())
      .def(py::init([](std::vector<DecoderLayer> layers, Linear lm_head, at::Tensor final_norm, int64_t heads,
                       int64_t kv_heads, int64_t head_dim, double eps, int64_t tile, bool batch_invariant,
                       const std::optional<double>& scale, const std::optional<double>& attn_softcap,
                       const std::string& activation, const std::optional<double>& final_softcap) {
             return Executor(std::move(layers), std::move(lm_head), final_norm, heads, kv_heads, head_dim, eps, tile,
                             batch_invariant, scale.value_or(1.0 / std::sqrt(static_cast<double>(head_dim))),
                             or_zero(attn_softcap), activation, or_zero(final_softcap));
           }),
           py::arg("layers"), py::arg("lm_head"), py::arg("final_norm"), py::arg("heads"), py::arg("kv_heads"),
           py::arg("head_dim"), py::arg("eps"), py::arg("tile"), py::arg("batch_invariant") = false, py::kw_only(),
           py::arg("scale") = py::none(), py::arg("attn_softcap") = py::none(), py::arg("activation") = "silu",
           py::arg("final_softcap") = py::none())
      .def("plan", &Executor::plan)
      .def("forward", &Executor::forward, py::call_guard<py::gil_scoped_release>())
      .def("logits", &Executor::logits, py::call_guard<py::gil_scoped_release>());
}
