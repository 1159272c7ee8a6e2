// A step's attention, and all decoder layers of a Llama-family model for one step, each in one call
// (compiled after kernels.cpp, prefill_attention.cpp and vnni_linear.cpp, whose functions they run).
// model_layers runs the same operations, in the same order, as LlamaForCausalLM.forward's Python
// loop does where these kernels serve it (so the same result, bit for bit), without the Python
// between them. Float32 activations.
#include <torch/extension.h>

#include <vector>

namespace {

// attention_step without its checks and GIL release (model_layers holds none).
torch::Tensor attention_step_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                  const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                  const torch::Tensor& slot_mapping, const torch::Tensor& segments,
                                  const torch::Tensor& prefill_tables, const torch::Tensor& decode_rows,
                                  const torch::Tensor& decode_tables, const torch::Tensor& decode_lens, int64_t heads,
                                  int64_t tile, double scale) {
  const int64_t rows = qkv.size(0), kv_heads = k_cache.size(2), dim = k_cache.size(3);
  const bool prefill = segments.size(0) > 0, decode_only = decode_rows.size(0) == rows;
  torch::Tensor x = qkv.contiguous(), c = cos.reshape({rows, dim}).contiguous(), sn = sin.reshape({rows, dim}).contiguous();
  torch::Tensor slots = slot_mapping.contiguous();
  torch::Tensor q = torch::empty({rows, heads, dim}, torch::kFloat32);
  torch::Tensor k_rows, v_rows;
  if (prefill) {
    k_rows = torch::empty({rows, kv_heads, dim}, torch::kFloat32);
    v_rows = torch::empty({rows, kv_heads, dim}, torch::kFloat32);
  }
  torch::Tensor out = decode_only ? torch::Tensor() : torch::empty({rows, heads, dim}, torch::kFloat32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "attention_step", [&] {
    write_rotated<scalar_t>(x.data_ptr<float>(), c.data_ptr<float>(), sn.data_ptr<float>(), slots.data_ptr<int64_t>(),
                            rows, heads, kv_heads, dim, static_cast<float>(scale), q.data_ptr<float>(),
                            k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            prefill ? k_rows.data_ptr<float>() : nullptr, prefill ? v_rows.data_ptr<float>() : nullptr);
    if (decode_rows.size(0) > 0) {
      const torch::Tensor dq = decode_only ? q : q.index_select(0, decode_rows);
      torch::Tensor decoded = lean_decode_impl<scalar_t>(dq, k_cache, v_cache, decode_tables.contiguous(),
                                                         decode_lens.contiguous(), tile);
      if (decode_only)
        out = decoded;
      else
        out.index_copy_(0, decode_rows, decoded);
    }
  });
  if (prefill)      // q is scaled already
    prefill_attention_impl(q, k_rows, v_rows, k_cache, v_cache, segments, prefill_tables, 1.0, out);
  return out.view({rows, heads * dim});
}

}  // namespace

// One layer's attention for a step, on float32 activations: the rotary embedding of the queries and
// keys in qkv [T, (H + 2 Hkv) D] (cos and signed sin [T, D]), the new keys and values written to
// their cache slots (k_cache, v_cache [num_blocks, block_size, Hkv, D] of any float dtype), then
// prefill_attention for the prefill segments (segments [S, 3] and prefill_tables as it takes them;
// S may be 0) and lean attention for the decode rows (decode_rows [B], their block tables [B, >=
// blocks] and context lengths [B], all int64; B may be 0). Returns [T, H D] float32.
torch::Tensor attention_step(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                             torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor segments,
                             torch::Tensor prefill_tables, torch::Tensor decode_rows, torch::Tensor decode_tables,
                             torch::Tensor decode_lens, int64_t heads, int64_t tile, double scale) {
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && cos.scalar_type() == torch::kFloat32 &&
                  k_cache.scalar_type() == v_cache.scalar_type(), "float32 activations, one cache dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slot_mapping.scalar_type() == torch::kInt64,
              "contiguous caches and int64 slots");
  const int64_t rows = qkv.size(0), kv_heads = k_cache.size(2), dim = k_cache.size(3);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (heads + 2 * kv_heads) * dim && slot_mapping.size(0) == rows,
              "qkv does not fit the cache's heads");
  TORCH_CHECK(segments.size(0) == 0 || prefill_attention_supported(heads, kv_heads, dim),
              "prefill segments need prefill_attention_supported");
  TORCH_CHECK(segments.scalar_type() == torch::kInt64 && decode_rows.scalar_type() == torch::kInt64,
              "int64 segments and rows");
  pybind11::gil_scoped_release no_gil;
  return attention_step_impl(qkv, cos, sin, k_cache, v_cache, slot_mapping, segments.contiguous(),
                             prefill_tables.contiguous(), decode_rows, decode_tables, decode_lens, heads, tile, scale);
}

// x [T, hidden]: the step's token embeddings, float32. weights: per layer, in order, the input and
// post-attention norm weights, then (packed, scales_mins) of qkv, o, gate_up and down, every linear
// on the VNNI kernel; groups: those four linears' group sizes per layer; k_caches, v_caches: each
// layer's cache. cos, sin, slots, segments, tables, decode rows and lengths as attention_step takes
// them. Returns the last layer's output plus its residual stream: LlamaForCausalLM.forward's result.
torch::Tensor model_layers(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<int64_t> groups,
                           std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches, double eps,
                           torch::Tensor cos, torch::Tensor sin, torch::Tensor slot_mapping, torch::Tensor segments,
                           torch::Tensor prefill_tables, torch::Tensor decode_rows, torch::Tensor decode_tables,
                           torch::Tensor decode_lens, int64_t heads, int64_t tile, double scale) {
  const int64_t layers = static_cast<int64_t>(k_caches.size()), hidden = x.size(1);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be float32 [B, hidden]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 10 * layers && static_cast<int64_t>(groups.size()) == 4 * layers &&
                  v_caches.size() == k_caches.size(), "10 weights and 4 group sizes a layer");
  TORCH_CHECK(segments.size(0) == 0 || prefill_attention_supported(heads, k_caches[0].size(2), k_caches[0].size(3)),
              "prefill segments need prefill_attention_supported");
  pybind11::gil_scoped_release no_gil;     // the server's event loop runs meanwhile
  const int64_t qkv_width = (heads + 2 * k_caches[0].size(2)) * k_caches[0].size(3);
  const torch::Tensor segs = segments.contiguous(), tables = prefill_tables.contiguous();
  torch::Tensor residual = x.contiguous();
  for (int64_t i = 0; i < layers; ++i) {
    const torch::Tensor* w = weights.data() + 10 * i;
    const int64_t* g = groups.data() + 4 * i;
    const int64_t intermediate = w[8].size(1) * 32;          // down's K: its 32-wide blocks
    if (i == 0)
      x = at::rms_norm(residual, {hidden}, w[0], eps);
    else
      fused_add_rms_norm(x, residual, w[0], eps);
    torch::Tensor qkv = vnni_linear(x, w[2], w[3], g[0], qkv_width);
    torch::Tensor attention = attention_step_impl(qkv, cos, sin, k_caches[i], v_caches[i], slot_mapping, segs, tables,
                                                  decode_rows, decode_tables, decode_lens, heads, tile, scale);
    x = vnni_linear(attention, w[4], w[5], g[1], hidden);
    fused_add_rms_norm(x, residual, w[1], eps);
    x = vnni_linear(silu_mul(vnni_linear(x, w[6], w[7], g[2], 2 * intermediate)), w[8], w[9], g[3], hidden);
  }
  return x.add_(residual);
}
