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
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
// 16 cache values as float32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// 16 float32 values stored as T, rounded to nearest even as static_cast<T> rounds them (NaN aside).
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(double* p, __m512 x) {
  _mm512_storeu_pd(p, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
  _mm512_storeu_pd(p + 8, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
}
inline void store16(at::Half* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store16(at::BFloat16* p, __m512 x) {      // c10's rounding: + 0x7FFF + the lowest kept bit
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
template <typename T>
inline void store_any(T* p, __m512 x) { store16(p, x); }
#endif
template <typename T>
inline void store_any(T* p, float x) { *p = static_cast<T>(x); }

// A cache row as float32: float16 and bfloat16 caches convert 16 values an instruction where
// AVX-512 builds; a float32 cache is read in place.
template <typename scalar_t>
const float* row_as_float(const scalar_t* src, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    int64_t i = 0;
#if defined(__AVX512F__)
    if constexpr (!std::is_same_v<scalar_t, double>)
      for (; i + 16 <= n; i += 16) _mm512_storeu_ps(buffer + i, load16(src + i));
#endif
    for (; i < n; ++i) buffer[i] = static_cast<float>(src[i]);
    return buffer;
  }
}

#if defined(__AVX512F__)
// exp of 16 floats: 2^(x log2 e) = 2^n 2^f, n = round(x log2 e), 2^f (|f| <= 1/2) by its degree-6
// Taylor polynomial in f ln 2 (relative error ~1e-7), 2^n by scalef.
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#endif

// Softmax of each head's scores [heads, n] in place; lse[h] = log sum exp.
inline void softmax_rows(float* scores, int64_t heads, int64_t n, float* lse) {
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores + h * n;
    float m = -std::numeric_limits<float>::infinity();
    int64_t t = 0;
#if defined(__AVX512F__)
    __m512 top = _mm512_set1_ps(m);
    for (; t + 16 <= n; t += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + t));
    m = _mm512_reduce_max_ps(top);
#endif
    for (; t < n; ++t) m = std::max(m, s[t]);
    float sum = 0.f;
    t = 0;
#if defined(__AVX512F__)
    __m512 sums = _mm512_setzero_ps();
    for (; t + 16 <= n; t += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), _mm512_set1_ps(m)));
      _mm512_storeu_ps(s + t, e);
      sums = _mm512_add_ps(sums, e);
    }
    sum = _mm512_reduce_add_ps(sums);
#endif
    for (; t < n; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    lse[h] = m + std::log(sum);
    const float inv = 1.f / sum;
    for (t = 0; t < n; ++t) s[t] *= inv;
  }
}

#if defined(__AVX512F__)
// Lane t of the result is the sum of v[t]'s 16 lanes: 16 horizontal sums in 45 instructions
// (pairwise interleaved adds: within 128-bit lanes, then across them).
inline __m512 sum_lanes16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xEE));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
}

// out[j] = sum_t p[j n + t] v_t for HC query heads j of one KV head, with the outputs in registers
// while the tokens pass; v_t at v + rows[t].
template <typename scalar_t, int DV, int HC>
inline void weigh_values(const scalar_t* v, const int64_t* rows, int64_t n, const float* p, float* out) {
  __m512 acc[HC][DV];
  for (int j = 0; j < HC; ++j)
    for (int i = 0; i < DV; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    __m512 vv[DV];
    for (int i = 0; i < DV; ++i) vv[i] = load16(v + rows[t] + 16 * i);
    for (int j = 0; j < HC; ++j) {
      const __m512 w = _mm512_set1_ps(p[j * n + t]);
      for (int i = 0; i < DV; ++i) acc[j][i] = _mm512_fmadd_ps(w, vv[i], acc[j][i]);
    }
  }
  for (int j = 0; j < HC; ++j)
    for (int i = 0; i < DV; ++i) _mm512_storeu_ps(out + j * 16 * DV + 16 * i, acc[j][i]);
}

// attend_tile for head dims of 16 x DV, in two passes over the tile's tokens.
// Keys, token by token: the row of every KV head is read once, and each query head's product with
// it kept as 16 lanes to add up; every 16 tokens, sum_lanes16 turns those into 16 scores a head.
// The pass prefetches each token's keys and values `ahead` tokens early, across the cache's
// scattered blocks (without it the loads wait on memory; GCC drops prefetches written in a lambda).
// Values, a KV head at a time: its query heads' outputs (up to kHeads a pass) stay in registers.
template <typename scalar_t, int DV>
void attend_tile_simd(const float* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* table,
                      int64_t start, int64_t end, int64_t block_size, int64_t kv_heads, int64_t groups,
                      float* scores, float* out, float* lse) {
  constexpr int64_t dim = 16 * DV, line = 64 / sizeof(scalar_t), ahead = 8;
  constexpr int kHeads = DV <= 4 ? 4 : 2;
  const int64_t n = end - start, heads = kv_heads * groups, row = kv_heads * dim;
  thread_local std::vector<int64_t> row_buffer;
  thread_local std::vector<__m512> lane_buffer;
  row_buffer.resize(n);
  lane_buffer.resize(16 * heads);
  int64_t* rows = row_buffer.data();
  __m512* lanes = lane_buffer.data();            // [heads, 16 tokens]
  for (int64_t t = 0, pos = start; t < n; ++t, ++pos)
    rows[t] = (table[pos / block_size] * block_size + pos % block_size) * row;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t u = t == 0 ? 0 : t + ahead; u <= std::min(t + ahead, n - 1); ++u)   // first: tokens 0..ahead
      for (int64_t i = 0; i < row; i += line) {
        _mm_prefetch(reinterpret_cast<const char*>(k_cache + rows[u] + i), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(v_cache + rows[u] + i), _MM_HINT_T0);
      }
    const scalar_t* k = k_cache + rows[t];
    for (int64_t g = 0; g < kv_heads; ++g) {
      __m512 kv[DV];
      for (int i = 0; i < DV; ++i) kv[i] = load16(k + g * dim + 16 * i);
      for (int64_t h = g * groups; h < (g + 1) * groups; ++h) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + h * dim), kv[0]);
        for (int i = 1; i < DV; ++i) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * dim + 16 * i), kv[i], acc);
        lanes[h * 16 + t % 16] = acc;
      }
    }
    if (t % 16 == 15 || t == n - 1) {
      const int64_t t0 = t - t % 16, count = t % 16 + 1;
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t i = count; i < 16; ++i) lanes[h * 16 + i] = _mm512_setzero_ps();
        _mm512_mask_storeu_ps(scores + h * n + t0, static_cast<__mmask16>((1u << count) - 1),
                              sum_lanes16(lanes + h * 16));
      }
    }
  }
  softmax_rows(scores, heads, n, lse);
  for (int64_t g = 0; g < kv_heads; ++g) {
    for (int64_t h0 = g * groups; h0 < (g + 1) * groups; h0 += kHeads) {
      const int64_t hc = std::min<int64_t>(kHeads, (g + 1) * groups - h0);
      const scalar_t* v = v_cache + g * dim;
      if (hc == kHeads) weigh_values<scalar_t, DV, kHeads>(v, rows, n, scores + h0 * n, out + h0 * dim);
      else if (hc == 3) weigh_values<scalar_t, DV, 3>(v, rows, n, scores + h0 * n, out + h0 * dim);
      else if (hc == 2) weigh_values<scalar_t, DV, 2>(v, rows, n, scores + h0 * n, out + h0 * dim);
      else weigh_values<scalar_t, DV, 1>(v, rows, n, scores + h0 * n, out + h0 * dim);
    }
  }
}
#endif

// One tile: tokens [start, end) of one sequence, all its query heads. A token's keys (and
// values) for every KV head are one contiguous row of the cache block, read once.
template <typename scalar_t>
void attend_tile(const float* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* table,
                 int64_t start, int64_t end, int64_t block_size, int64_t kv_heads, int64_t groups, int64_t dim,
                 float* scores, float* out, float* lse) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (dim == 64)
      return attend_tile_simd<scalar_t, 4>(q, k_cache, v_cache, table, start, end, block_size, kv_heads, groups,
                                           scores, out, lse);
    if (dim == 128)
      return attend_tile_simd<scalar_t, 8>(q, k_cache, v_cache, table, start, end, block_size, kv_heads, groups,
                                           scores, out, lse);
  }
#endif
  const int64_t n = end - start, heads = kv_heads * groups, row = kv_heads * dim;
  std::vector<float> buffer(std::is_same_v<scalar_t, float> ? 0 : row);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = start + t;
    const float* k = row_as_float(k_cache + (table[pos / block_size] * block_size + pos % block_size) * row, row,
                                  buffer.data());
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = q + h * dim;
      const float* kh = k + (h / groups) * dim;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += qh[d] * kh[d];
      scores[h * n + t] = dot;
    }
  }
  softmax_rows(scores, heads, n, lse);
  std::fill(out, out + heads * dim, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = start + t;
    const float* v = row_as_float(v_cache + (table[pos / block_size] * block_size + pos % block_size) * row, row,
                                  buffer.data());
    for (int64_t h = 0; h < heads; ++h) {
      const float p = scores[h * n + t];
      const float* vh = v + (h / groups) * dim;
      float* o = out + h * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) o[d] += p * vh[d];
    }
  }
}

// qf: the queries [B, H, D], float32, contiguous and already multiplied by the softmax scale.
// Returns the attention output [B, H, D] in float32.
template <typename scalar_t>
torch::Tensor lean_decode_impl(const torch::Tensor& qf, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t tile) {
  const int64_t batch = qf.size(0), heads = qf.size(1), dim = qf.size(2);
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
  // Every tile writes all of its partial outputs and log-sum-exps: no need to zero them first.
  const std::unique_ptr<float[]> partial_out(new float[num_tiles * heads * dim]);
  const std::unique_ptr<float[]> partial_lse(new float[num_tiles * heads]);

  const float* qd = qf.data_ptr<float>();
  const scalar_t* kd = k_cache.data_ptr<scalar_t>();
  const scalar_t* vd = v_cache.data_ptr<scalar_t>();

  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(heads * tile);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = tile_seq[i], s = tile_start[i];
      attend_tile<scalar_t>(qd + b * heads * dim, kd, vd, tables + b * table_stride, s, std::min(s + tile, lens[b]),
                            block_size, kv_heads, groups, dim, scores.data(), partial_out.get() + i * heads * dim,
                            partial_lse.get() + i * heads);
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
        const float* p = partial_out.get() + (i * heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] += w * p[d];
      }
      for (int64_t d = 0; d < dim; ++d) o[d] /= total;
    }
  });
  return merged;
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
  torch::Tensor qf = (q.to(torch::kFloat32) * scale).contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "lean_attention_decode", [&] {
    out = lean_decode_impl<scalar_t>(qf, k_cache, v_cache, tables, lens, tile);
  });
  return out.to(q.scalar_type());
}

// The rotary embedding of a step's queries and keys in qkv [T, (H + 2 Hkv) D] (cos and signed sin
// [T, D], HF's rotate-half layout: x cos + roll(x, D/2) sin): queries into q [T, H, D], times
// `scale`; keys (rotated) and values into their cache slots (float32, float16 or bfloat16) and,
// where k_rows and v_rows are given, into those [T, Hkv, D] float32 as well.
template <typename scalar_t>
void write_rotated(const float* qkv, const float* cos, const float* sin, const int64_t* slots, int64_t batch,
                   int64_t heads, int64_t kv_heads, int64_t dim, float scale, float* q, scalar_t* k_cache,
                   scalar_t* v_cache, float* k_rows, float* v_rows) {
  const int64_t width = (heads + 2 * kv_heads) * dim, half = dim / 2;
  // x cos + roll(x, D/2) sin for one head's D values (16 at a time where the halves are whole vectors).
  auto rotate = [&](const float* x, const float* c, const float* sn, float factor, auto&& store) {
    int64_t d = 0;
#if defined(__AVX512F__)
    if (half % 16 == 0)
      for (; d < dim; d += 16) {
        const __m512 rolled = _mm512_mul_ps(_mm512_loadu_ps(x + (d + half) % dim), _mm512_loadu_ps(sn + d));
        store(d, _mm512_mul_ps(_mm512_fmadd_ps(_mm512_loadu_ps(x + d), _mm512_loadu_ps(c + d), rolled),
                               _mm512_set1_ps(factor)));
      }
#endif
    for (; d < dim; ++d) store(d, (x[d] * c[d] + x[(d + half) % dim] * sn[d]) * factor);
  };
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* row = qkv + b * width;
      const float* cb = cos + b * dim;
      const float* sb = sin + b * dim;
      for (int64_t h = 0; h < heads; ++h) {                  // queries, rotated and scaled
        float* dst = q + (b * heads + h) * dim;
        rotate(row + h * dim, cb, sb, scale, [&](int64_t d, auto x) { store_any(dst + d, x); });
      }
      for (int64_t h = 0; h < kv_heads; ++h) {               // keys, rotated; values as they are
        const float* value = row + (heads + kv_heads + h) * dim;
        scalar_t* k = k_cache + (slots[b] * kv_heads + h) * dim;
        scalar_t* v = v_cache + (slots[b] * kv_heads + h) * dim;
        float* k_row = k_rows ? k_rows + (b * kv_heads + h) * dim : nullptr;
        rotate(row + (heads + h) * dim, cb, sb, 1.f, [&](int64_t d, auto x) {
          store_any(k + d, x);
          if (k_row) store_any(k_row + d, x);
        });
        int64_t d = 0;
#if defined(__AVX512F__)
        for (; d + 16 <= dim; d += 16) store16(v + d, _mm512_loadu_ps(value + d));
#endif
        for (; d < dim; ++d) v[d] = static_cast<scalar_t>(value[d]);
        if (v_rows) std::copy_n(value, dim, v_rows + (b * kv_heads + h) * dim);
      }
    }
  });
}

// In place, for float32 [T, H] rows: residual += x, then x = residual * rsqrt(mean(residual^2) + eps)
// * weight: a decoder layer's residual add and the next RMSNorm in one pass.
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && residual.scalar_type() == torch::kFloat32 &&
                  weight.scalar_type() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.size(-1) == weight.size(0), "shapes do not match");
  const int64_t hidden = weight.size(0), rows = x.numel() / hidden;
  float* xd = x.data_ptr<float>();
  float* rd = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* xr = xd + r * hidden;
      float* rr = rd + r * hidden;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < hidden; ++i) {
        rr[i] += xr[i];
        squares += rr[i] * rr[i];
      }
      const float inverse = 1.f / std::sqrt(squares / hidden + static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) xr[i] = rr[i] * inverse * w[i];
    }
  });
}

// gate_up [T, 2 I] float32 -> silu(gate) * up [T, I], silu(x) = x / (1 + exp(-x)): the MLP's
// activation in one pass (exp16 where AVX-512 builds).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat32 && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
              "gate_up must be float32 [T, 2 I]");
  const torch::Tensor x = gate_up.contiguous();
  const int64_t rows = x.size(0), width = x.size(1) / 2;
  torch::Tensor out = torch::empty({rows, width}, torch::kFloat32);
  const float* xd = x.data_ptr<float>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = xd + r * 2 * width;
      const float* up = gate + width;
      float* o = od + r * width;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= width; i += 16) {
        const __m512 g = _mm512_loadu_ps(gate + i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)),
                                              _mm512_loadu_ps(up + i)));
      }
#endif
      for (; i < width; ++i) o[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}
