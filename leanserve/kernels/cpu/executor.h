// The native executor: a Llama-family model's decoder layers, their weights and caches bound once
// at load, run for a whole step in one call (StepPlan: the step's tiles and prefill items, worked out
// once for all layers). The same operations as LlamaForCausalLM's torch forward, on float32
// activations: RMSNorm, the fused q/k/v and gate/up linears, rotary embedding, paged attention,
// SiLU-and-multiply, residual adds.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "attention.h"
#include "linear.h"
#include "ops.h"

namespace leanserve {

// y = x W^T: W packed (pack_int4 / pack_int8) or dense float32 [N, K].
struct Linear {
  at::Tensor packed, scales_mins, dense;
  int64_t group = 0, out_features = 0;

  static Linear quantized(at::Tensor packed, at::Tensor scales_mins, int64_t group, int64_t out_features) {
    TORCH_CHECK(packed.scalar_type() == at::kByte && scales_mins.scalar_type() == at::kHalf, "packed weights");
    return {packed, scales_mins, at::Tensor(), group, out_features};
  }
  static Linear from_dense(at::Tensor weight) {
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2, "a float32 [N, K] weight");
    return {at::Tensor(), at::Tensor(), weight.contiguous(), 0, weight.size(0)};
  }
  at::Tensor operator()(const at::Tensor& x) const {
    return dense.defined() ? at::linear(x, dense) : quant_linear(x, packed, scales_mins, group, out_features);
  }
};

struct DecoderLayer {
  at::Tensor input_norm, post_attention_norm;
  Linear qkv, o, gate_up, down;
  at::Tensor k_cache, v_cache;
};

class Executor {
 public:
  Executor(std::vector<DecoderLayer> layers, Linear lm_head, at::Tensor final_norm, int64_t heads, int64_t kv_heads,
           int64_t head_dim, double eps, int64_t tile, bool batch_invariant)
      : layers_(std::move(layers)), lm_head_(std::move(lm_head)), final_norm_(final_norm.contiguous()), heads_(heads),
        kv_heads_(kv_heads), head_dim_(head_dim), eps_(eps), tile_(tile), batch_invariant_(batch_invariant) {
    TORCH_CHECK(!layers_.empty() && tile > 0, "an executor needs layers and a tile size");
    for (const DecoderLayer& layer : layers_) {
      check_cache(layer.k_cache, layer.v_cache, kv_heads, head_dim);
      TORCH_CHECK(layer.qkv.out_features == (heads + 2 * kv_heads) * head_dim, "qkv does not fit the heads");
    }
  }

  // The plan of a step; per sequence its first row in the flat batch, new tokens, context after
  // them and block table; the new tokens' cache slots.
  StepPlan plan(const std::vector<int64_t>& query_starts, const std::vector<int64_t>& query_lens,
                const std::vector<int64_t>& context_lens, const std::vector<std::vector<int64_t>>& block_tables,
                at::Tensor slots) const {
    return StepPlan(query_starts, query_lens, context_lens, block_tables, slots, layers_[0].k_cache.size(1), heads_,
                    kv_heads_, tile_, batch_invariant_);
  }

  // x [T, hidden]: the step's token embeddings; cos and signed sin [T, D] of their positions.
  // Returns the last layer's output plus its residual stream (the hidden states before the final norm).
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, StepPlan& plan) const {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "x must be float32 [T, hidden]");
    TORCH_CHECK(plan.slots.size(0) == x.size(0) && plan.heads == heads_, "the plan is another step's");
    const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
    at::Tensor residual = x.contiguous();
    for (size_t i = 0; i < layers_.size(); ++i) {
      const DecoderLayer& layer = layers_[i];
      if (i == 0)
        x = rms_norm(residual, layer.input_norm, eps_);
      else
        add_rms_norm(x, residual, layer.input_norm, eps_);
      const at::Tensor attention = attention_step(layer.qkv(x), cos, sin, layer.k_cache, layer.v_cache, plan, scale);
      x = layer.o(attention);
      add_rms_norm(x, residual, layer.post_attention_norm, eps_);
      x = layer.down(silu_mul(layer.gate_up(x)));
    }
    return x.add_(residual);
  }

  // Logits [B, vocab] float32 of hidden states [B, hidden]: the final norm and the LM head.
  at::Tensor logits(const at::Tensor& hidden) const {
    return lm_head_(rms_norm(hidden.to(at::kFloat).contiguous(), final_norm_, eps_));
  }

 private:
  std::vector<DecoderLayer> layers_;
  Linear lm_head_;
  at::Tensor final_norm_;
  int64_t heads_, kv_heads_, head_dim_;
  double eps_;
  int64_t tile_;
  bool batch_invariant_;      // every row through the prefill kernel (StepPlan)
};

}  // namespace leanserve
