// The native executor: a decoder's layers, their weights and caches bound once at load, run for a
// whole step in one call (StepPlan: the step's tiles and prefill items, worked out once for all
// layers). The same operations as DecoderForCausalLM's torch forward, on float32 activations, for
// every family from one layer description: each layer's optional parts (biases, q/k norms, the norms
// of the attention's and the MLP's outputs, a sliding window, its rotary table) are fields that are
// set or not, and the model's options (score scale, soft-caps, activation) are the executor's.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "attention.h"
#include "linear.h"
#include "ops.h"

namespace leanserve {

// y = x W^T: W packed (pack_int4 / pack_int8) or dense float32 [N, K].
struct Linear {
  at::Tensor packed, scales_mins, dense;
  int64_t group = 0, out_features = 0;

  // float16 or float32 scales_mins (linear.h: pack_scales_mins).
  static Linear quantized(at::Tensor packed, at::Tensor scales_mins, int64_t group, int64_t out_features) {
    check_packed(packed, scales_mins, group, out_features);
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

// One decoder layer. Undefined tensors and 0 mean "this family has none". The layer computes, on the
// residual stream r: x = input_norm(r); a = o(attention(qkv(x) + qkv_bias, q/k norms, its rotary
// table, window)); r += attn_output_norm(a); x = post_attention_norm(r); r += mlp_output_norm(down(act(gate) up)).
struct DecoderLayer {
  at::Tensor input_norm, post_attention_norm;      // [hidden]: before the attention, before the MLP
  at::Tensor attn_output_norm, mlp_output_norm;    // [hidden]: of the attention's and the MLP's outputs (Gemma)
  Linear qkv, o, gate_up, down;
  at::Tensor qkv_bias;                             // [(H + 2 Hkv) D] (Qwen2)
  at::Tensor q_norm, k_norm;                       // [D]: RMSNorm of each q and k head (Qwen3, Gemma 3)
  int64_t window = 0;                              // sliding window (Mistral, Gemma), 0: full attention
  int64_t rope = 0;                                // which of forward's rotary tables
  at::Tensor k_cache, v_cache;
};

class Executor {
 public:
  // scale: the attention's score scale; attn_softcap, final_softcap: 0 for none; activation: "silu"
  // or "gelu_tanh".
  Executor(std::vector<DecoderLayer> layers, Linear lm_head, at::Tensor final_norm, int64_t heads, int64_t kv_heads,
           int64_t head_dim, double eps, int64_t tile, bool batch_invariant, double scale, double attn_softcap,
           const std::string& activation, double final_softcap)
      : layers_(std::move(layers)), lm_head_(std::move(lm_head)), final_norm_(final_norm.contiguous()), heads_(heads),
        kv_heads_(kv_heads), head_dim_(head_dim), eps_(eps), tile_(tile), batch_invariant_(batch_invariant),
        scale_(scale), attn_softcap_(attn_softcap), final_softcap_(final_softcap),
        activation_(activation_named(activation)) {
    TORCH_CHECK(!layers_.empty() && tile > 0, "an executor needs layers and a tile size");
    TORCH_CHECK(scale > 0 && attn_softcap >= 0 && final_softcap >= 0, "a positive scale, soft-caps >= 0");
    const int64_t width = (heads + 2 * kv_heads) * head_dim, hidden = final_norm_.size(0);
    auto check_vector = [](const at::Tensor& t, int64_t size, const char* what) {
      TORCH_CHECK(!t.defined() || (t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == size &&
                                   t.is_contiguous()), what, " must be a contiguous float32 [", size, "]");
    };
    for (const DecoderLayer& layer : layers_) {
      check_cache(layer.k_cache, layer.v_cache, kv_heads, head_dim);
      TORCH_CHECK(layer.qkv.out_features == width, "qkv does not fit the heads");
      TORCH_CHECK(layer.window >= 0 && layer.rope >= 0, "a layer's window and rotary table are >= 0");
      check_vector(layer.qkv_bias, width, "qkv_bias");
      check_vector(layer.q_norm, head_dim, "q_norm");
      check_vector(layer.k_norm, head_dim, "k_norm");
      check_vector(layer.attn_output_norm, hidden, "attn_output_norm");
      check_vector(layer.mlp_output_norm, hidden, "mlp_output_norm");
      if (std::find(windows_.begin(), windows_.end(), layer.window) == windows_.end()) windows_.push_back(layer.window);
    }
  }

  // The plan of a step; per sequence its first row in the flat batch, new tokens, context after
  // them and block table; the new tokens' cache slots. Decode tiles for every window the layers use.
  StepPlan plan(const std::vector<int64_t>& query_starts, const std::vector<int64_t>& query_lens,
                const std::vector<int64_t>& context_lens, const std::vector<std::vector<int64_t>>& block_tables,
                at::Tensor slots) const {
    return StepPlan(query_starts, query_lens, context_lens, block_tables, slots, layers_[0].k_cache.size(1), heads_,
                    kv_heads_, tile_, batch_invariant_, windows_);
  }

  // x [T, hidden]: the step's (scaled) token embeddings; rotary: cos and signed sin [T, D] of their
  // positions, one pair per rotary table the layers index. Returns the last layer's output plus its
  // residual stream (the hidden states before the final norm).
  at::Tensor forward(at::Tensor x, const std::vector<std::pair<at::Tensor, at::Tensor>>& rotary, StepPlan& plan) const {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "x must be float32 [T, hidden]");
    TORCH_CHECK(plan.slots.size(0) == x.size(0) && plan.heads == heads_, "the plan is another step's");
    at::Tensor residual = x.contiguous();
    for (size_t i = 0; i < layers_.size(); ++i) {
      const DecoderLayer& layer = layers_[i];
      TORCH_CHECK(layer.rope < static_cast<int64_t>(rotary.size()), "no rotary table ", layer.rope);
      if (i == 0)
        x = rms_norm(residual, layer.input_norm, eps_);
      else
        add_rms_norm(x, residual, layer.input_norm, eps_);
      const AttentionOptions options{static_cast<float>(scale_), static_cast<float>(attn_softcap_), layer.window};
      const HeadPrep prep{data_or_null(layer.qkv_bias), data_or_null(layer.q_norm), data_or_null(layer.k_norm),
                          static_cast<float>(eps_)};
      const auto& [cos, sin] = rotary[layer.rope];
      x = layer.o(attention_step(layer.qkv(x), cos, sin, layer.k_cache, layer.v_cache, plan, options, prep));
      if (layer.attn_output_norm.defined()) x = rms_norm(x, layer.attn_output_norm, eps_);
      add_rms_norm(x, residual, layer.post_attention_norm, eps_);
      x = layer.down(gated(activation_, layer.gate_up(x)));
      if (layer.mlp_output_norm.defined()) x = rms_norm(x, layer.mlp_output_norm, eps_);
    }
    return x.add_(residual);
  }

  // Logits [B, vocab] float32 of hidden states [B, hidden]: the final norm, the LM head, the soft-cap.
  at::Tensor logits(const at::Tensor& hidden) const {
    at::Tensor out = lm_head_(rms_norm(hidden.to(at::kFloat).contiguous(), final_norm_, eps_));
    return final_softcap_ > 0 ? out.div_(final_softcap_).tanh_().mul_(final_softcap_) : out;
  }

 private:
  static const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

  std::vector<DecoderLayer> layers_;
  Linear lm_head_;
  at::Tensor final_norm_;
  int64_t heads_, kv_heads_, head_dim_;
  double eps_;
  int64_t tile_;
  bool batch_invariant_;      // decode rows with the prefill kernel's arithmetic (StepPlan)
  double scale_, attn_softcap_, final_softcap_;
  Activation activation_;
  std::vector<int64_t> windows_;   // the layers' distinct windows
};

}  // namespace leanserve
