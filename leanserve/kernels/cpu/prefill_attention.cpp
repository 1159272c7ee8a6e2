// Causal attention of a step's prefill segments (compiled after kernels.cpp, whose load16 and exp16
// it uses): flash attention on AVX-512, float32 arithmetic, keys and values read from the step's
// new rows and, for a cached prefix, straight from the paged cache (any float dtype).
//
// A work item is one KV head and a block of query tokens of one segment: its 48 rows are the
// block's tokens times the G query heads of the head's group (48 / G tokens). Queries are held
// transposed, Qt [D, 48], so the rows lie along the vector lanes: scores St [keys, 48] are
// broadcast key values times Qt, the online softmax (running max and sum per row) is elementwise
// across keys, and the output Ot [D, 48] gathers broadcast value entries times St's probabilities.
// Keys are taken 32 at a time, converted to float32 once per item; a block past the item's last
// token is skipped (causal), one that straddles it is masked. Items are handed to threads
// longest first (OpenMP dynamic schedule), since a late block of a long prompt sees many keys.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kRows = 48, kRowVecs = kRows / 16, kKeys = 32, kKeyGroup = 8, kDimGroup = 8;

#if defined(__AVX512F__)
struct PrefillSegment {
  int64_t start, q_len, context;   // first row in q, new tokens, tokens after them (cached + new)
  const int64_t* table;
};

// keys [n, D] float32 of positions [first, first + n) of a segment: cached ones from the cache,
// new ones from `fresh` (the step's rows [T, Hkv, D], the segment's first new token at row `start`).
template <typename scalar_t>
void gather_keys(const PrefillSegment& seg, const scalar_t* cache, const float* fresh, int64_t head, int64_t kv_heads,
                 int64_t dim, int64_t block_size, int64_t first, int64_t n, float* out) {
  const int64_t cached = seg.context - seg.q_len;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t pos = first + j;
    float* dst = out + j * dim;
    if (pos >= cached) {
      std::copy_n(fresh + ((seg.start + pos - cached) * kv_heads + head) * dim, dim, dst);
    } else {
      const int64_t slot = seg.table[pos / block_size] * block_size + pos % block_size;
      const scalar_t* src = cache + (slot * kv_heads + head) * dim;
      for (int64_t d = 0; d < dim; d += 16) _mm512_storeu_ps(dst + d, load16(src + d));
    }
  }
}

// One item: KV head `head`, query tokens [t0, t0 + tokens) of `seg`; writes their rows of out [T, H, D].
template <typename scalar_t>
void prefill_item(const PrefillSegment& seg, int64_t head, int64_t t0, int64_t tokens, const float* q, const float* k,
                  const float* v, const scalar_t* k_cache, const scalar_t* v_cache, int64_t heads, int64_t kv_heads,
                  int64_t dim, int64_t block_size, float scale, float* out, float* scratch) {
  const int64_t groups = heads / kv_heads, rows = tokens * groups, cached = seg.context - seg.q_len;
  float* qt = scratch;                   // [D, 48]
  float* ot = qt + dim * kRows;          // [D, 48]
  float* st = ot + dim * kRows;          // [32, 48]
  float* keys = st + kKeys * kRows;      // [32, D]
  float* values = keys + kKeys * dim;    // [32, D]
  alignas(64) int32_t position[kRows];   // each row's token position; padding rows see every key
  std::fill(qt, qt + dim * kRows, 0.f);
  std::fill(ot, ot + dim * kRows, 0.f);
  for (int64_t r = 0; r < kRows; ++r) position[r] = std::numeric_limits<int32_t>::max();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / groups, h = head * groups + r % groups;
    const float* src = q + ((seg.start + t) * heads + h) * dim;
    for (int64_t d = 0; d < dim; ++d) qt[d * kRows + r] = src[d] * scale;
    position[r] = static_cast<int32_t>(cached + t);
  }
  __m512i row_position[kRowVecs];
  __m512 row_max[kRowVecs], row_sum[kRowVecs];
  for (int i = 0; i < kRowVecs; ++i) {
    row_position[i] = _mm512_load_si512(position + 16 * i);
    row_max[i] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    row_sum[i] = _mm512_setzero_ps();
  }
  const int64_t first_pos = cached + t0, end = cached + t0 + tokens;    // keys [0, end) are visible to someone
  for (int64_t k0 = 0; k0 < end; k0 += kKeys) {
    const int64_t n = std::min(kKeys, end - k0);
    gather_keys(seg, k_cache, k, head, kv_heads, dim, block_size, k0, n, keys);
    gather_keys(seg, v_cache, v, head, kv_heads, dim, block_size, k0, n, values);
    // Scores: st[j, r] = keys[j] . qt[:, r], eight keys at a time.
    for (int64_t j0 = 0; j0 < n; j0 += kKeyGroup) {
      const int64_t m = std::min(kKeyGroup, n - j0);
      __m512 acc[kKeyGroup][kRowVecs];
      for (int j = 0; j < kKeyGroup; ++j)
        for (int i = 0; i < kRowVecs; ++i) acc[j][i] = _mm512_setzero_ps();
      for (int64_t d = 0; d < dim; ++d) {
        __m512 qv[kRowVecs];
#pragma GCC unroll 8
        for (int i = 0; i < kRowVecs; ++i) qv[i] = _mm512_loadu_ps(qt + d * kRows + 16 * i);
        for (int j = 0; j < kKeyGroup; ++j) {
          const __m512 key = _mm512_set1_ps(keys[(j0 + std::min<int64_t>(j, m - 1)) * dim + d]);
          for (int i = 0; i < kRowVecs; ++i) acc[j][i] = _mm512_fmadd_ps(key, qv[i], acc[j][i]);
        }
      }
      for (int j = 0; j < kKeyGroup; ++j)    // all eight (st has room): a partial store would spill acc
        for (int i = 0; i < kRowVecs; ++i) _mm512_storeu_ps(st + (j0 + j) * kRows + 16 * i, acc[j][i]);
    }
    // The online softmax; keys past a row's token get probability 0 (the causal mask).
    __m512 alpha[kRowVecs];
    for (int i = 0; i < kRowVecs; ++i) {
      auto hidden = [&](int64_t j) {
        return k0 + j > first_pos
                   ? _mm512_cmplt_epi32_mask(row_position[i], _mm512_set1_epi32(static_cast<int32_t>(k0 + j)))
                   : __mmask16(0);
      };
      __m512 top = row_max[i];
      for (int64_t j = 0; j < n; ++j)
        top = _mm512_mask_max_ps(top, static_cast<__mmask16>(~hidden(j)), top, _mm512_loadu_ps(st + j * kRows + 16 * i));
      alpha[i] = exp16(_mm512_sub_ps(row_max[i], top));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const __m512 p = _mm512_maskz_mov_ps(static_cast<__mmask16>(~hidden(j)),
                                             exp16(_mm512_sub_ps(_mm512_loadu_ps(st + j * kRows + 16 * i), top)));
        _mm512_storeu_ps(st + j * kRows + 16 * i, p);
        sum = _mm512_add_ps(sum, p);
      }
      row_sum[i] = _mm512_fmadd_ps(row_sum[i], alpha[i], sum);
      row_max[i] = top;
    }
    // ot[d, r] = alpha[r] ot[d, r] + sum_j values[j, d] st[j, r], eight dims at a time.
    for (int64_t d0 = 0; d0 < dim; d0 += kDimGroup) {
      __m512 acc[kDimGroup][kRowVecs];
      for (int e = 0; e < kDimGroup; ++e)
        for (int i = 0; i < kRowVecs; ++i)
          acc[e][i] = _mm512_mul_ps(_mm512_loadu_ps(ot + (d0 + e) * kRows + 16 * i), alpha[i]);
      for (int64_t j = 0; j < n; ++j) {
        __m512 p[kRowVecs];
        for (int i = 0; i < kRowVecs; ++i) p[i] = _mm512_loadu_ps(st + j * kRows + 16 * i);
#pragma GCC unroll 8
        for (int e = 0; e < kDimGroup; ++e) {
          const __m512 value = _mm512_set1_ps(values[j * dim + d0 + e]);
          for (int i = 0; i < kRowVecs; ++i) acc[e][i] = _mm512_fmadd_ps(value, p[i], acc[e][i]);
        }
      }
      for (int e = 0; e < kDimGroup; ++e)
        for (int i = 0; i < kRowVecs; ++i) _mm512_storeu_ps(ot + (d0 + e) * kRows + 16 * i, acc[e][i]);
    }
  }
  alignas(64) float inverse[kRows];
  for (int i = 0; i < kRowVecs; ++i) _mm512_store_ps(inverse + 16 * i, _mm512_div_ps(_mm512_set1_ps(1.f), row_sum[i]));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / groups, h = head * groups + r % groups;
    float* dst = out + ((seg.start + t) * heads + h) * dim;
    for (int64_t d = 0; d < dim; ++d) dst[d] = ot[d * kRows + r] * inverse[r];
  }
}

struct PrefillItem { int64_t seg, head, t0, tokens, cost; };

// The items, longest first, over the threads (each with its own scratch).
template <typename scalar_t>
void run_items(const std::vector<PrefillItem>& items, const std::vector<PrefillSegment>& segs, const torch::Tensor& q,
               const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& k_cache,
               const torch::Tensor& v_cache, float scale, torch::Tensor& out) {
  const int64_t heads = q.size(1), kv_heads = k.size(1), dim = q.size(2), block_size = k_cache.size(1);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scratch(2 * dim * kRows + kKeys * kRows + 2 * kKeys * dim);
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < items.size(); ++i) {
      const PrefillItem& it = items[i];
      prefill_item<scalar_t>(segs[it.seg], it.head, it.t0, it.tokens, q.data_ptr<float>(), k.data_ptr<float>(),
                             v.data_ptr<float>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), heads,
                             kv_heads, dim, block_size, scale, out.data_ptr<float>(), scratch.data());
    }
  }
}
#endif

}  // namespace

// Whether prefill_attention runs for this head layout: an AVX-512 build, head_dim a multiple of
// 16, and G = heads / kv_heads dividing 48.
bool prefill_attention_supported(int64_t heads, int64_t kv_heads, int64_t head_dim) {
#if defined(__AVX512F__)
  return kv_heads > 0 && heads % kv_heads == 0 && kRows % (heads / kv_heads) == 0 && head_dim % 16 == 0;
#else
  return false;
#endif
}

namespace {

// prefill_attention without its checks, for callers that hold no GIL (step_layers.cpp).
void prefill_attention_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& segments,
                            const torch::Tensor& block_tables, double scale, torch::Tensor& out) {
#if defined(__AVX512F__)
  const int64_t heads = q.size(1), kv_heads = k.size(1), per_item = kRows / (heads / kv_heads);
  const int64_t* seg_data = segments.data_ptr<int64_t>();
  std::vector<PrefillSegment> segs;
  std::vector<PrefillItem> items;
  for (int64_t s = 0; s < segments.size(0); ++s) {
    const int64_t* row = seg_data + 3 * s;
    segs.push_back({row[0], row[1], row[2], block_tables.data_ptr<int64_t>() + s * block_tables.size(1)});
    for (int64_t t0 = 0; t0 < row[1]; t0 += per_item)
      for (int64_t h = 0; h < kv_heads; ++h)
        items.push_back({s, h, t0, std::min(per_item, row[1] - t0), row[2] - row[1] + t0 + per_item});
  }
  std::sort(items.begin(), items.end(), [](const PrefillItem& a, const PrefillItem& b) { return a.cost > b.cost; });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "prefill_attention", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "a float64 cache is not supported");
    } else {
      run_items<scalar_t>(items, segs, q, k, v, k_cache, v_cache, static_cast<float>(scale), out);
    }
  });
#endif
}

}  // namespace

// q [T, H, D], k and v [T, Hkv, D]: the step's rows, float32 (q rotated, unscaled). segments int64
// [S, 3]: (first row, new tokens, context = cached + new) of each prefill segment, whose new tokens
// are positions [context - new, context); block_tables int64 [S, >= blocks] reach its cached prefix
// in k_cache and v_cache [num_blocks, block_size, Hkv, D]. Writes the segments' rows of out [T, H, D].
void prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor segments, torch::Tensor block_tables, double scale, torch::Tensor out) {
  const int64_t heads = q.size(1), kv_heads = k.size(1), dim = q.size(2);
  TORCH_CHECK(prefill_attention_supported(heads, kv_heads, dim), "unsupported head layout (or no AVX-512)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
                  v.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32, "float32 rows");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous tensors");
  TORCH_CHECK(segments.scalar_type() == torch::kInt64 && block_tables.scalar_type() == torch::kInt64 &&
                  segments.is_contiguous() && block_tables.is_contiguous(), "int64 segments and block tables");
  TORCH_CHECK(k_cache.size(2) == kv_heads && k_cache.size(3) == dim && out.sizes() == q.sizes(), "shapes do not match");
  pybind11::gil_scoped_release no_gil;
  prefill_attention_impl(q, k, v, k_cache, v_cache, segments, block_tables, scale, out);
}
