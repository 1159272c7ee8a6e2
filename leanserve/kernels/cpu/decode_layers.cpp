// The decoder layers of a Llama-family model for one decode-only step, in one call (compiled after
// kernels.cpp and vnni_linear.cpp, whose functions it runs): the same operations, in the same order,
// as LlamaForCausalLM.forward's Python loop (so the same result, bit for bit), without the Python
// between them. Float32 activations; every linear on the VNNI kernel.
#include <torch/extension.h>

#include <vector>

// x [B, hidden]: the step's token embeddings, float32. weights: per layer, in order, the input and
// post-attention norm weights, then (packed, scales_mins) of qkv, o, gate_up and down; groups: those
// four linears' group sizes per layer; k_caches, v_caches: each layer's cache. cos, sin, slots,
// block tables and context lengths as decode_attention_step takes them. Returns the last layer's
// output plus its residual stream: LlamaForCausalLM.forward's result.
torch::Tensor decode_layers(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<int64_t> groups,
                            std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches, double eps,
                            torch::Tensor cos, torch::Tensor sin, torch::Tensor slot_mapping,
                            torch::Tensor block_tables, torch::Tensor context_lens, int64_t heads, int64_t tile,
                            double scale) {
  pybind11::gil_scoped_release no_gil;     // the server's event loop runs meanwhile
  const int64_t layers = static_cast<int64_t>(k_caches.size()), hidden = x.size(1);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be float32 [B, hidden]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 10 * layers && static_cast<int64_t>(groups.size()) == 4 * layers &&
                  v_caches.size() == k_caches.size(), "10 weights and 4 group sizes a layer");
  const int64_t qkv_width = (heads + 2 * k_caches[0].size(2)) * k_caches[0].size(3);
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
    torch::Tensor attention = decode_attention_step(qkv, cos, sin, k_caches[i], v_caches[i], slot_mapping,
                                                    block_tables, context_lens, heads, tile, scale);
    x = vnni_linear(attention, w[4], w[5], g[1], hidden);
    fused_add_rms_norm(x, residual, w[1], eps);
    const std::vector<torch::Tensor> gate_up = vnni_linear(x, w[6], w[7], g[2], 2 * intermediate).chunk(2, -1);
    x = vnni_linear(at::silu(gate_up[0]) * gate_up[1], w[8], w[9], g[3], hidden);
  }
  return x.add_(residual);
}
