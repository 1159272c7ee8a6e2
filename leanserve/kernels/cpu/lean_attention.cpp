// Lean attention decode over a paged KV cache, for the CPU (compiled at first use by
// leanserve/kernels/cpu_kernels.py).
//
// Stream-K decomposition (DESIGN.md): every sequence's context is cut into tiles of `tile`
// tokens; the flat list of all tiles is split into contiguous, equal ranges, one per thread
// (at::parallel_for); a range may end inside one sequence's tiles and start inside the next.
// A tile reads its keys and values straight from the cache blocks through the block table;
// on the CPU it serves all heads of its tokens (each KV head with the G query heads of its
// group), so every cached row [kv_heads, D] is read once, contiguously. It writes partial
// outputs and log-sum-exps; a second pass merges each head's partials by log-sum-exp:
// O = sum_i exp(lse_i - L) o_i, L = log sum_i exp(lse_i).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// One tile: tokens [start, end) of one sequence, all its query heads. A token's keys (and
// values) for every KV head are one contiguous row of the cache block, read once.
template <typename scalar_t>
void attend_tile(const float* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* table,
                 int64_t start, int64_t end, int64_t block_size, int64_t kv_heads, int64_t groups, int64_t dim,
                 float* scores, float* out, float* lse) {
  const int64_t n = end - start, heads = kv_heads * groups, row = kv_heads * dim;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = start + t;
    const scalar_t* k = k_cache + (table[pos / block_size] * block_size + pos % block_size) * row;
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = q + h * dim;
      const scalar_t* kh = k + (h / groups) * dim;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += qh[d] * static_cast<float>(kh[d]);
      scores[h * n + t] = dot;
    }
  }
  std::fill(out, out + heads * dim, 0.f);
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores + h * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    lse[h] = m + std::log(sum);
    for (int64_t t = 0; t < n; ++t) s[t] /= sum;
  }
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = start + t;
    const scalar_t* v = v_cache + (table[pos / block_size] * block_size + pos % block_size) * row;
    for (int64_t h = 0; h < heads; ++h) {
      const float p = scores[h * n + t];
      const scalar_t* vh = v + (h / groups) * dim;
      float* o = out + h * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) o[d] += p * static_cast<float>(vh[d]);
    }
  }
}

template <typename scalar_t>
void lean_decode_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t tile,
                      double scale, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), groups = heads / kv_heads;
  const int64_t table_stride = block_tables.size(1);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();

  // The flat tile list: (sequence, first token); each sequence's tiles are consecutive.
  std::vector<int64_t> tile_seq, tile_start, seq_first(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < lens[b]; s += tile) {
      tile_seq.push_back(b);
      tile_start.push_back(s);
    }
    seq_first[b + 1] = static_cast<int64_t>(tile_seq.size());
  }
  const int64_t num_tiles = static_cast<int64_t>(tile_seq.size());
  std::vector<float> partial_out(num_tiles * heads * dim), partial_lse(num_tiles * heads);

  // Queries in float32, pre-scaled: [B, H, D].
  torch::Tensor qf = (q.to(torch::kFloat32) * scale).contiguous();
  const float* qd = qf.data_ptr<float>();
  const scalar_t* kd = k_cache.data_ptr<scalar_t>();
  const scalar_t* vd = v_cache.data_ptr<scalar_t>();

  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(heads * tile);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = tile_seq[i], s = tile_start[i];
      attend_tile<scalar_t>(qd + b * heads * dim, kd, vd, tables + b * table_stride, s, std::min(s + tile, lens[b]),
                            block_size, kv_heads, groups, dim, scores.data(), partial_out.data() + i * heads * dim,
                            partial_lse.data() + i * heads);
    }
  });

  torch::Tensor merged = torch::empty({batch, heads, dim}, torch::kFloat32);
  float* md = merged.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / heads, h = pair % heads;
      float* o = md + pair * dim;
      std::fill(o, o + dim, 0.f);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t i = seq_first[b]; i < seq_first[b + 1]; ++i) top = std::max(top, partial_lse[i * heads + h]);
      float total = 0.f;
      for (int64_t i = seq_first[b]; i < seq_first[b + 1]; ++i) {
        const float w = std::exp(partial_lse[i * heads + h] - top);
        total += w;
        const float* p = partial_out.data() + (i * heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] += w * p[d];
      }
      for (int64_t d = 0; d < dim; ++d) o[d] /= total;
    }
  });
  out.copy_(merged);
}

}  // namespace

// q [B, H, D]; k_cache, v_cache [num_blocks, block_size, kv_heads, D] (contiguous); block_tables [B, >= blocks]
// int64; context_lens [B] int64 (each >= 1). Returns [B, H, D] in q's dtype.
torch::Tensor lean_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                    torch::Tensor block_tables, torch::Tensor context_lens, int64_t tile,
                                    double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the cache must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && q.size(2) == k_cache.size(3), "heads do not match the cache");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && context_lens.scalar_type() == torch::kInt64,
              "block tables and context lengths must be int64");
  TORCH_CHECK(tile > 0, "tile must be positive");
  torch::Tensor out = torch::empty(q.sizes(), q.options());
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "lean_attention_decode", [&] {
    lean_decode_impl<scalar_t>(q, k_cache, v_cache, tables, lens, tile, scale, out);
  });
  return out;
}
