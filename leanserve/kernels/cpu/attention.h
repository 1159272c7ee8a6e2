// Attention over the paged KV cache: one step's plan, lean attention for decode rows, flash attention
// for prefill segments, and the rotary embedding with the cache write before them. Float32 arithmetic;
// the cache [num_blocks, block_size, Hkv, D] holds float32, float16 or bfloat16. Every key and value,
// the step's own included, is read from the cache: a token's attention does not depend on whether
// its prefix was computed in this step, an earlier chunk or read from the prefix cache.
//
// Lean attention (DESIGN.md): every decode row's context is cut into tiles of `tile` tokens; the
// flat list of all tiles is split into contiguous, equal ranges, one per thread (stream-K), which
// may end inside one sequence's tiles and start inside the next. A tile serves all query heads of
// its tokens (each KV head with the G query heads of its group), so every cached row [Hkv, D] is
// read once, contiguously. It writes partial outputs and log-sum-exps; a second pass merges each
// head's partials: O = sum_i exp(lse_i - L) o_i, L = log sum_i exp(lse_i).
//
// Prefill: a work item is one KV head and up to kRows consecutive (token, query head) rows of its
// group in one segment. Queries are held transposed, Qt [D, kRows], so the rows lie along the
// vector lanes: scores St [keys, kRows] are broadcast key values times Qt, the online softmax
// (running max and sum per row) is elementwise across keys, and the output Ot [D, kRows] gathers
// broadcast value entries times St's probabilities. Keys are taken kKeys at a time, converted to
// float32 once per item; a block past the item's last token is skipped (causal), one that straddles
// it is masked. Items are handed to threads longest first (OpenMP dynamic schedule).
//
// What a layer may add (AttentionOptions): a sliding window (a token at position p sees keys at
// positions > p - window; lean decode's tiles start at the window's edge, prefill items skip the key
// blocks before every row's window and mask the rest per row) and soft-capped scores
// (cap tanh(s / cap) before the softmax, s already scaled). Before the rotation, write_rotated adds
// the q/k/v biases and normalizes each query and key head (HeadPrep).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace leanserve {

constexpr int64_t kRowVecs = 3, kRows = kRowVecs * simd::kLanes, kKeys = 32;
constexpr int64_t kKeyGroup = simd::kRegisters == 32 ? 8 : 4, kDimGroup = kKeyGroup;

// What one layer's attention computes beyond causal softmax attention (kernels/attention.py's
// AttentionOptions): scores = scale q.k, then softcap tanh(scores / softcap) where softcap > 0; with
// window > 0 a token at position p sees the keys at positions > p - window.
struct AttentionOptions {
  float scale = 1.f, softcap = 0.f;
  int64_t window = 0;
};

// A step's batch as attention sees it, worked out once per step and shared by every layer.
// A row with one new token is a decode row (lean attention); a row with more is a prefill segment.
// The decode rows' tiles are planned once for each window the step's layers use (0: full attention).
// Batch-invariant plans send the decode rows through invariant_decode instead, which sums what
// prefill_item sums in its order: a token's attention is then the same bits whether it is decoded,
// prefilled in one piece or in chunks, or recomputed after preemption (lean attention's tiles and
// merge compute the same values in another order).
struct StepPlan {
  struct Tile { int64_t seq, start, end; };                 // decode sequence, tokens [start, end)
  struct Segment { int64_t start, q_len, context; const int64_t* table; };
  struct Item { int64_t seg, head, first, rows, cost; };    // KV head, flat rows [first, first + rows)
  struct TileSet {                                          // the decode rows' tiles for one window
    int64_t window;
    std::vector<Tile> tiles;
    std::vector<int64_t> first_tile;                        // [decode rows + 1]: each decode row's tiles
  };

  int64_t block_size, heads, kv_heads, tile;
  bool batch_invariant;
  at::Tensor slots;                          // [T] int64: the cache slot of each new token
  std::vector<int64_t> tables;               // every sequence's block table, back to back
  std::vector<int64_t> decode_rows, decode_contexts;
  std::vector<const int64_t*> decode_tables;
  std::vector<int64_t> decode_order;         // batch-invariant plans: the decode rows, longest context first
  std::vector<TileSet> tile_sets;            // one a window
  std::vector<Segment> segments;
  std::vector<Item> items;                   // longest first
  std::vector<float> partial_out, partial_lse;    // lean attention's scratch, reused by every layer

  StepPlan(const std::vector<int64_t>& query_starts, const std::vector<int64_t>& query_lens,
           const std::vector<int64_t>& context_lens, const std::vector<std::vector<int64_t>>& block_tables,
           at::Tensor slot_mapping, int64_t block_size_, int64_t heads_, int64_t kv_heads_, int64_t tile_,
           bool batch_invariant_ = false, const std::vector<int64_t>& windows = {0})
      : block_size(block_size_), heads(heads_), kv_heads(kv_heads_), tile(tile_), batch_invariant(batch_invariant_),
        slots(slot_mapping.contiguous()) {
    const size_t n = query_lens.size();
    TORCH_CHECK(query_starts.size() == n && context_lens.size() == n && block_tables.size() == n,
                "one start, length, context and block table a sequence");
    TORCH_CHECK(block_size > 0 && tile > 0 && kv_heads > 0 && heads % kv_heads == 0, "bad step layout");
    TORCH_CHECK(slots.scalar_type() == at::kLong, "int64 slots");
    std::vector<size_t> offsets;
    for (const auto& t : block_tables) {
      offsets.push_back(tables.size());
      tables.insert(tables.end(), t.begin(), t.end());
    }
    const int64_t groups = heads / kv_heads;
    for (size_t s = 0; s < n; ++s) {
      const int64_t context = context_lens[s], q_len = query_lens[s];
      TORCH_CHECK(q_len >= 1 && context >= q_len && query_starts[s] >= 0 && query_starts[s] + q_len <= slots.size(0),
                  "a sequence's new tokens must be rows of the step");
      TORCH_CHECK(static_cast<int64_t>(block_tables[s].size()) * block_size >= context,
                  "a sequence's block table must cover its context");
      const int64_t* table = tables.data() + offsets[s];
      if (q_len == 1) {
        decode_rows.push_back(query_starts[s]);
        decode_contexts.push_back(context);
        decode_tables.push_back(table);
        continue;
      }
      const int64_t seg = static_cast<int64_t>(segments.size()), cached = context - q_len;
      segments.push_back({query_starts[s], q_len, context, table});
      for (int64_t first = 0; first < q_len * groups; first += kRows) {
        const int64_t rows = std::min(kRows, q_len * groups - first), last_token = (first + rows - 1) / groups;
        for (int64_t h = 0; h < kv_heads; ++h) items.push_back({seg, h, first, rows, cached + last_token + 1});
      }
    }
    std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
    if (batch_invariant) {
      for (size_t b = 0; b < decode_rows.size(); ++b) decode_order.push_back(static_cast<int64_t>(b));
      std::stable_sort(decode_order.begin(), decode_order.end(),
                       [&](int64_t a, int64_t b) { return decode_contexts[a] > decode_contexts[b]; });
      return;
    }
    for (const int64_t window : windows) {
      TORCH_CHECK(window >= 0, "a window is positive, or 0 for none");
      TileSet set{window, {}, {0}};
      for (size_t b = 0; b < decode_rows.size(); ++b) {
        const int64_t context = decode_contexts[b], seq = static_cast<int64_t>(b);
        for (int64_t start = window ? std::max<int64_t>(0, context - window) : 0; start < context; start += tile)
          set.tiles.push_back({seq, start, std::min(start + tile, context)});
        set.first_tile.push_back(static_cast<int64_t>(set.tiles.size()));
      }
      tile_sets.push_back(std::move(set));
    }
  }

  const TileSet& tiles_of(int64_t window) const {
    for (const TileSet& set : tile_sets)
      if (set.window == window) return set;
    TORCH_CHECK(false, batch_invariant ? "a batch-invariant plan has no lean attention tiles"
                                       : "the step was planned without window ", window);
  }
};

// Soft-capped scores: cap tanh(s / cap).
inline simd::Vec soft_cap(simd::Vec s, float cap) {
  return simd::mul(simd::set1(cap), simd::tanh(simd::div(s, simd::set1(cap))));
}

// ------------------------------------------------------------------------------------ lean decode

// Softmax of each head's scores [heads, n] in place; lse[h] = log sum exp.
inline void softmax_rows(float* scores, int64_t heads, int64_t n, float* lse) {
  constexpr int64_t L = simd::kLanes;
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores + h * n;
    float m = -std::numeric_limits<float>::infinity();
    int64_t t = 0;
    simd::Vec top = simd::set1(m);
    for (; t + L <= n; t += L) top = simd::max(top, simd::load(s + t));
    m = simd::reduce_max(top);
    for (; t < n; ++t) m = std::max(m, s[t]);
    simd::Vec sums = simd::zero();
    for (t = 0; t + L <= n; t += L) {
      const simd::Vec e = simd::exp(simd::sub(simd::load(s + t), simd::set1(m)));
      simd::store(s + t, e);
      sums = simd::add(sums, e);
    }
    float sum = simd::reduce_add(sums);
    for (; t < n; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    lse[h] = m + std::log(sum);
    const float inv = 1.f / sum;
    for (t = 0; t < n; ++t) s[t] *= inv;
  }
}

// out[j] (DC vectors) = sum_t p[j stride + t] v_t for HC query heads j of one KV head, t in order, the
// outputs held in registers while the tokens pass; v_t at v + rows[t]. With alpha, out[j] starts as
// alpha[j] out[j] (the online softmax's rescaling), else as 0.
template <typename T, int DC, int HC>
inline void weigh_values(const T* v, const int64_t* rows, int64_t n, const float* p, int64_t stride,
                         const float* alpha, float* out, int64_t dim) {
  simd::Vec acc[HC][DC];
  for (int j = 0; j < HC; ++j)
    for (int i = 0; i < DC; ++i)
      acc[j][i] = alpha ? simd::mul(simd::load(out + j * dim + simd::kLanes * i), simd::set1(alpha[j])) : simd::zero();
  for (int64_t t = 0; t < n; ++t) {
    simd::Vec vv[DC];
    for (int i = 0; i < DC; ++i) vv[i] = simd::load(v + rows[t] + simd::kLanes * i);
    for (int j = 0; j < HC; ++j) {
      const simd::Vec w = simd::set1(p[j * stride + t]);
      for (int i = 0; i < DC; ++i) acc[j][i] = simd::fmadd(vv[i], w, acc[j][i]);
    }
  }
  for (int j = 0; j < HC; ++j)
    for (int i = 0; i < DC; ++i) simd::store(out + j * dim + simd::kLanes * i, acc[j][i]);
}

// Calls f(h, std::integral_constant<int, HC>) for the heads [h, h + HC) of `heads`, in chunks of as many
// as the registers hold (4 with 32 registers, 2 with 16).
template <typename F>
inline void for_head_chunks(int64_t heads, F&& f) {
  constexpr int64_t kHeads = simd::kRegisters == 32 ? 4 : 2;
  for (int64_t h = 0; h < heads; h += kHeads) {
    const int64_t hc = std::min(kHeads, heads - h);
    if (hc == 4) f(h, std::integral_constant<int, 4>());
    else if (hc == 3) f(h, std::integral_constant<int, 3>());
    else if (hc == 2) f(h, std::integral_constant<int, 2>());
    else f(h, std::integral_constant<int, 1>());
  }
}

// weigh_values for `heads` query heads of one KV head over all dim entries (v, out at the head's start).
template <typename T>
void weigh_all_values(const T* v, const int64_t* rows, int64_t n, const float* p, int64_t stride, const float* alpha,
                      float* out, int64_t dim, int64_t heads) {
  const int64_t vecs = dim / simd::kLanes;
  for (int64_t c = 0; c < vecs;) {
    const int64_t dc = vecs - c >= 4 ? 4 : vecs - c >= 2 ? 2 : 1;
    for_head_chunks(heads, [&](int64_t h, auto hc) {
      constexpr int HC = decltype(hc)::value;
      const float* a = alpha ? alpha + h : nullptr;
      float* o = out + h * dim + simd::kLanes * c;
      const T* vc = v + simd::kLanes * c;
      if (dc == 4) weigh_values<T, 4, HC>(vc, rows, n, p + h * stride, stride, a, o, dim);
      else if (dc == 2) weigh_values<T, 2, HC>(vc, rows, n, p + h * stride, stride, a, o, dim);
      else weigh_values<T, 1, HC>(vc, rows, n, p + h * stride, stride, a, o, dim);
    });
    c += dc;
  }
}

// One tile: tokens [start, end) of one sequence, all its query heads, in two passes over the tokens.
// Keys, token by token: the row of every KV head is read once (KC vectors at a time, held in
// registers while the group's query heads meet them), each query head's product with it kept as
// kLanes lanes to add up; every kLanes tokens, sum_lanes turns those into kLanes scores a head.
// The pass prefetches each token's keys and values `ahead` tokens early, across the cache's
// scattered blocks (without it the loads wait on memory).
// Values, a KV head at a time: its query heads' outputs stay in registers (weigh_values).
template <typename T, int KC>
void attend_tile(const float* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t start, int64_t end,
                 int64_t block_size, int64_t kv_heads, int64_t groups, int64_t dim, float softcap, float* scores,
                 float* out, float* lse) {
  constexpr int64_t L = simd::kLanes, line = 64 / sizeof(T), ahead = 8;
  const int64_t n = end - start, heads = kv_heads * groups, row = kv_heads * dim, vecs = dim / L;
  thread_local std::vector<int64_t> row_buffer;
  thread_local std::vector<simd::Vec> lane_buffer;
  row_buffer.resize(n);
  lane_buffer.resize(L * heads);
  int64_t* rows = row_buffer.data();
  simd::Vec* lanes = lane_buffer.data();            // [heads, L tokens]
  for (int64_t t = 0, pos = start; t < n; ++t, ++pos)
    rows[t] = (table[pos / block_size] * block_size + pos % block_size) * row;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t u = t == 0 ? 0 : t + ahead; u <= std::min(t + ahead, n - 1); ++u)   // first: tokens 0..ahead
      for (int64_t i = 0; i < row; i += line) {
        simd::prefetch(k_cache + rows[u] + i);
        simd::prefetch(v_cache + rows[u] + i);
      }
    const T* k = k_cache + rows[t];
    for (int64_t g = 0; g < kv_heads; ++g) {
      for (int64_t c = 0; c < vecs; c += KC) {
        simd::Vec kv[KC];
        for (int i = 0; i < KC; ++i) kv[i] = simd::load(k + g * dim + L * (c + i));
        for (int64_t h = g * groups; h < (g + 1) * groups; ++h) {
          const float* qh = q + h * dim + L * c;
          simd::Vec acc = c == 0 ? simd::zero() : lanes[h * L + t % L];
          for (int i = 0; i < KC; ++i) acc = simd::fmadd(simd::load(qh + L * i), kv[i], acc);
          lanes[h * L + t % L] = acc;
        }
      }
    }
    if (t % L == L - 1 || t == n - 1) {
      const int64_t t0 = t - t % L, count = t % L + 1;
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t i = count; i < L; ++i) lanes[h * L + i] = simd::zero();
        simd::store_partial(scores + h * n + t0, simd::sum_lanes(lanes + h * L), static_cast<int>(count));
      }
    }
  }
  if (softcap > 0)
    for_vectors(heads * n, [&](int64_t i, int m) { store_n(scores + i, soft_cap(load_n(scores + i, m), softcap), m); });
  softmax_rows(scores, heads, n, lse);
  for (int64_t g = 0; g < kv_heads; ++g)
    weigh_all_values(v_cache + g * dim, rows, n, scores + g * groups * n, n, nullptr, out + g * groups * dim, dim,
                     groups);
}

// attend_tile with the widest key chunk (8, 4, 2 or 1 vectors) that divides the head's vectors.
template <typename T>
void attend_tile_any(int64_t dim, const float* q, const T* k_cache, const T* v_cache, const int64_t* table,
                     int64_t start, int64_t end, int64_t block_size, int64_t kv_heads, int64_t groups, float softcap,
                     float* scores, float* out, float* lse) {
  const int64_t vecs = dim / simd::kLanes;
  auto run = [&](auto kc) {
    attend_tile<T, decltype(kc)::value>(q, k_cache, v_cache, table, start, end, block_size, kv_heads, groups, dim,
                                        softcap, scores, out, lse);
  };
  if (vecs % 8 == 0) run(std::integral_constant<int, 8>());
  else if (vecs % 4 == 0) run(std::integral_constant<int, 4>());
  else if (vecs % 2 == 0) run(std::integral_constant<int, 2>());
  else run(std::integral_constant<int, 1>());
}

// Lean attention for the plan's decode rows: q [T, H, D] float32 (scaled already), writes their rows of out.
template <typename T>
void lean_decode(StepPlan& plan, const AttentionOptions& options, const float* q, const T* k_cache, const T* v_cache,
                 int64_t dim, float* out) {
  const StepPlan::TileSet& set = plan.tiles_of(options.window);
  const int64_t heads = plan.heads, groups = heads / plan.kv_heads, tile = plan.tile;
  const int64_t num_tiles = static_cast<int64_t>(set.tiles.size());
  if (num_tiles == 0) return;
  plan.partial_out.resize(std::max<size_t>(plan.partial_out.size(), num_tiles * heads * dim));   // every tile
  plan.partial_lse.resize(std::max<size_t>(plan.partial_lse.size(), num_tiles * heads));         // writes all its own
  float* partial_out = plan.partial_out.data();
  float* partial_lse = plan.partial_lse.data();
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(heads * tile);
    for (int64_t i = begin; i < end; ++i) {
      const StepPlan::Tile& t = set.tiles[i];
      attend_tile_any<T>(dim, q + plan.decode_rows[t.seq] * heads * dim, k_cache, v_cache, plan.decode_tables[t.seq],
                         t.start, t.end, plan.block_size, plan.kv_heads, groups, options.softcap, scores.data(),
                         partial_out + i * heads * dim, partial_lse + i * heads);
    }
  });
  const int64_t batch = static_cast<int64_t>(plan.decode_rows.size());
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / heads, h = pair % heads;
      float* o = out + (plan.decode_rows[b] * heads + h) * dim;
      std::fill(o, o + dim, 0.f);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t i = set.first_tile[b]; i < set.first_tile[b + 1]; ++i)
        top = std::max(top, partial_lse[i * heads + h]);
      float total = 0.f;
      for (int64_t i = set.first_tile[b]; i < set.first_tile[b + 1]; ++i) {
        const float w = std::exp(partial_lse[i * heads + h] - top);
        total += w;
        const float* p = partial_out + (i * heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] += w * p[d];
      }
      for (int64_t d = 0; d < dim; ++d) o[d] /= total;
    }
  });
}

// ---------------------------------------------------------------------------------------- prefill

// rows [n, D] float32 of positions [first, first + n) of a segment's KV head, from the cache.
template <typename T>
void gather_rows(const StepPlan::Segment& seg, const T* cache, int64_t head, int64_t kv_heads, int64_t dim,
                 int64_t block_size, int64_t first, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t pos = first + j, slot = seg.table[pos / block_size] * block_size + pos % block_size;
    const T* src = cache + (slot * kv_heads + head) * dim;
    for (int64_t d = 0; d < dim; d += simd::kLanes) simd::store(out + j * dim + d, simd::load(src + d));
  }
}

// One item; q [T, H, D] float32, scaled already; writes its rows of out [T, H, D]. RV: the row vectors
// worked on (kRowVecs, or 1 for an item of at most kLanes rows, such as a decode row's query heads); each
// lane's arithmetic is the same either way.
// Batch invariance: a row's sums must not depend on the item it is in. Key blocks are aligned to
// position 0, and a block that lies wholly outside a row's window (or past its token) leaves the row's
// running max, sum and output exactly as they were (the max starts at the lowest finite float, so a
// block with no visible key scales by exp(0) = 1 and adds zeros): whether an item starts at such a
// block or skips it, the row gets the same bits.
template <typename T, int RV>
void prefill_item(const StepPlan::Segment& seg, const StepPlan::Item& item, const AttentionOptions& options,
                  const float* q, const T* k_cache, const T* v_cache, int64_t heads, int64_t kv_heads, int64_t dim,
                  int64_t block_size, float* out, float* scratch) {
  const int64_t groups = heads / kv_heads, cached = seg.context - seg.q_len;
  float* qt = scratch;                   // [D, kRows]
  float* ot = qt + dim * kRows;          // [D, kRows]
  float* st = ot + dim * kRows;          // [kKeys, kRows]
  float* keys = st + kKeys * kRows;      // [kKeys, D]
  float* values = keys + kKeys * dim;    // [kKeys, D]
  alignas(64) float position[kRows];     // each row's token position; padding rows repeat the last row's
  std::fill(qt, qt + dim * kRows, 0.f);
  std::fill(ot, ot + dim * kRows, 0.f);
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t f = item.first + std::min(r, item.rows - 1), t = f / groups, h = item.head * groups + f % groups;
    position[r] = static_cast<float>(cached + t);
    if (r >= item.rows) continue;
    const float* src = q + ((seg.start + t) * heads + h) * dim;
    for (int64_t d = 0; d < dim; ++d) qt[d * kRows + r] = src[d];
  }
  simd::Vec row_position[RV], row_max[RV], row_sum[RV];
  for (int i = 0; i < RV; ++i) {
    row_position[i] = simd::load(position + simd::kLanes * i);
    row_max[i] = simd::set1(std::numeric_limits<float>::lowest());
    row_sum[i] = simd::zero();
  }
  const int64_t window = options.window;
  const int64_t first_pos = cached + item.first / groups, last_pos = cached + (item.first + item.rows - 1) / groups;
  // Keys up to first_pos are past no row's token; keys after window_edge are inside every row's window;
  // blocks wholly before the first row's window are skipped.
  const int64_t window_edge = window ? last_pos - window : -1, end = last_pos + 1;
  const int64_t begin = window ? std::max<int64_t>(0, first_pos - window + 1) / kKeys * kKeys : 0;
  const simd::Vec minus_inf = simd::set1(-std::numeric_limits<float>::infinity());
  for (int64_t k0 = begin; k0 < end; k0 += kKeys) {
    const int64_t n = std::min(kKeys, end - k0);
    gather_rows(seg, k_cache, item.head, kv_heads, dim, block_size, k0, n, keys);
    gather_rows(seg, v_cache, item.head, kv_heads, dim, block_size, k0, n, values);
    // Scores: st[j, r] = keys[j] . qt[:, r], kKeyGroup keys at a time.
    for (int64_t j0 = 0; j0 < n; j0 += kKeyGroup) {
      const int64_t m = std::min(kKeyGroup, n - j0);
      simd::Vec acc[kKeyGroup][RV];
      for (int j = 0; j < kKeyGroup; ++j)
        for (int i = 0; i < RV; ++i) acc[j][i] = simd::zero();
      for (int64_t d = 0; d < dim; ++d) {
        simd::Vec qv[RV];
        for (int i = 0; i < RV; ++i) qv[i] = simd::load(qt + d * kRows + simd::kLanes * i);
        for (int j = 0; j < kKeyGroup; ++j) {
          const simd::Vec key = simd::set1(keys[(j0 + std::min<int64_t>(j, m - 1)) * dim + d]);
          for (int i = 0; i < RV; ++i) acc[j][i] = simd::fmadd(key, qv[i], acc[j][i]);
        }
      }
      for (int j = 0; j < kKeyGroup; ++j)    // all of them (st has room): a partial store would spill acc
        for (int i = 0; i < RV; ++i)
          simd::store(st + (j0 + j) * kRows + simd::kLanes * i,
                      options.softcap > 0 ? soft_cap(acc[j][i], options.softcap) : acc[j][i]);
    }
    // The online softmax; keys past a row's token (the causal mask) or at or before its position - window
    // get probability 0.
    simd::Vec alpha[RV];
    for (int i = 0; i < RV; ++i) {
      auto visible = [&](int64_t j, simd::Vec x, simd::Vec otherwise) {
        const int64_t key = k0 + j;
        if (key > first_pos) x = simd::select_ge(row_position[i], simd::set1(static_cast<float>(key)), x, otherwise);
        if (key <= window_edge)
          x = simd::select_ge(row_position[i], simd::set1(static_cast<float>(key + window)), otherwise, x);
        return x;
      };
      simd::Vec top = row_max[i];
      for (int64_t j = 0; j < n; ++j)
        top = simd::max(top, visible(j, simd::load(st + j * kRows + simd::kLanes * i), minus_inf));
      alpha[i] = simd::exp(simd::sub(row_max[i], top));
      simd::Vec sum = simd::zero();
      for (int64_t j = 0; j < n; ++j) {
        const simd::Vec p = visible(j, simd::exp(simd::sub(simd::load(st + j * kRows + simd::kLanes * i), top)),
                                    simd::zero());
        simd::store(st + j * kRows + simd::kLanes * i, p);
        sum = simd::add(sum, p);
      }
      row_sum[i] = simd::fmadd(row_sum[i], alpha[i], sum);
      row_max[i] = top;
    }
    // ot[d, r] = alpha[r] ot[d, r] + sum_j values[j, d] st[j, r], kDimGroup dims at a time.
    for (int64_t d0 = 0; d0 < dim; d0 += kDimGroup) {
      simd::Vec acc[kDimGroup][RV];
      for (int e = 0; e < kDimGroup; ++e)
        for (int i = 0; i < RV; ++i)
          acc[e][i] = simd::mul(simd::load(ot + (d0 + e) * kRows + simd::kLanes * i), alpha[i]);
      for (int64_t j = 0; j < n; ++j) {
        simd::Vec p[RV];
        for (int i = 0; i < RV; ++i) p[i] = simd::load(st + j * kRows + simd::kLanes * i);
        for (int e = 0; e < kDimGroup; ++e) {
          const simd::Vec value = simd::set1(values[j * dim + d0 + e]);
          for (int i = 0; i < RV; ++i) acc[e][i] = simd::fmadd(value, p[i], acc[e][i]);
        }
      }
      for (int e = 0; e < kDimGroup; ++e)
        for (int i = 0; i < RV; ++i) simd::store(ot + (d0 + e) * kRows + simd::kLanes * i, acc[e][i]);
    }
  }
  alignas(64) float inverse[kRows];
  for (int i = 0; i < RV; ++i) simd::store(inverse + simd::kLanes * i, simd::div(simd::set1(1.f), row_sum[i]));
  for (int64_t r = 0; r < item.rows; ++r) {
    const int64_t f = item.first + r, t = f / groups, h = item.head * groups + f % groups;
    float* dst = out + ((seg.start + t) * heads + h) * dim;
    for (int64_t d = 0; d < dim; ++d) dst[d] = ot[d * kRows + r] * inverse[r];
  }
}

// The plan's prefill items over the threads (each with its own scratch).
template <typename T>
void prefill_attention(const StepPlan& plan, const AttentionOptions& options, const float* q, const T* k_cache,
                       const T* v_cache, int64_t dim, float* out) {
  if (plan.items.empty()) return;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scratch(2 * dim * kRows + kKeys * kRows + 2 * kKeys * dim);
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < plan.items.size(); ++i) {
      const StepPlan::Item& item = plan.items[i];
      if (item.rows <= simd::kLanes)
        prefill_item<T, 1>(plan.segments[item.seg], item, options, q, k_cache, v_cache, plan.heads, plan.kv_heads, dim,
                           plan.block_size, out, scratch.data());
      else
        prefill_item<T, kRowVecs>(plan.segments[item.seg], item, options, q, k_cache, v_cache, plan.heads,
                                  plan.kv_heads, dim, plan.block_size, out, scratch.data());
    }
  }
}

// ------------------------------------------------------------------------- batch-invariant decode

// A decode row's attention with prefill_item's arithmetic, lane for lane, but laid out for one token
// (prefill_item would fill G of its lanes with the G query heads of a KV head): per KV head, key
// blocks of kKeys aligned to position 0 (from its window's first block), each score summed over d in
// order with the block's keys transposed so that they lie along the lanes, the online softmax per
// block with the probabilities summed in key order, and the outputs, dims along the lanes, summed over
// the block's keys in order. Every step is the same operation on the same operands as in prefill_item,
// so a token gets the same bits decoded as prefilled.

// kt [D, kKeys]: kt[d kKeys + j] = entry d of key j, the keys at cache + rows[j], j < n <= kKeys (the
// lanes past n repeat the last key).
template <typename T>
void gather_transposed(const T* cache, const int64_t* rows, int64_t n, int64_t dim, float* kt) {
  constexpr int64_t L = simd::kLanes;
  for (int64_t j0 = 0; j0 < kKeys; j0 += L)
    for (int64_t c = 0; c < dim; c += L) {
      simd::Vec t[L];
      for (int64_t i = 0; i < L; ++i) t[i] = simd::load(cache + rows[std::min(j0 + i, n - 1)] + c);
      simd::transpose(t);
      for (int64_t i = 0; i < L; ++i) simd::store(kt + (c + i) * kKeys + j0, t[i]);
    }
}

// scores [HC, kKeys] of HC query heads (q, rows of dim) against the keys kt: prefill_item's score loop.
template <int HC>
void block_scores(const float* kt, const float* q, int64_t dim, float* scores) {
  constexpr int64_t L = simd::kLanes, KV = kKeys / L;
  simd::Vec acc[HC][KV];
  for (int h = 0; h < HC; ++h)
    for (int v = 0; v < KV; ++v) acc[h][v] = simd::zero();
  for (int64_t d = 0; d < dim; ++d) {
    simd::Vec keys[KV];
    for (int v = 0; v < KV; ++v) keys[v] = simd::load(kt + d * kKeys + L * v);
    for (int h = 0; h < HC; ++h) {
      const simd::Vec qd = simd::set1(q[h * dim + d]);
      for (int v = 0; v < KV; ++v) acc[h][v] = simd::fmadd(qd, keys[v], acc[h][v]);
    }
  }
  for (int h = 0; h < HC; ++h)
    for (int v = 0; v < KV; ++v) simd::store(scores + h * kKeys + L * v, acc[h][v]);
}

inline float first_lane(simd::Vec x) {
  alignas(64) float lanes[simd::kLanes];
  simd::store(lanes, x);
  return lanes[0];
}

// prefill_item's online softmax of one key block for `groups` heads: scores [groups, kKeys] become the
// probabilities (soft-capped first where softcap > 0; the keys outside [first, n) take no part in the max
// and get probability 0); each head's running max and sum are updated and alpha gets its rescaling.
inline void block_softmax(float* scores, int64_t groups, int64_t first, int64_t n, float softcap, float* row_max,
                          float* row_sum, float* alpha) {
  constexpr int64_t L = simd::kLanes;
  for (int64_t h = 0; h < groups; ++h) {
    float* s = scores + h * kKeys;
    simd::Vec top = simd::set1(row_max[h]);
    for (int64_t v = 0; v < kKeys; v += L) {
      simd::Vec x = simd::load(s + v);
      if (softcap > 0) x = soft_cap(x, softcap);
      simd::store(s + v, x);
    }
    for (int64_t j = 0; j < kKeys; ++j)
      if (j < first || j >= n) s[j] = std::numeric_limits<float>::lowest();
    for (int64_t v = 0; v < kKeys; v += L) top = simd::max(top, simd::load(s + v));
    const float m = simd::reduce_max(top);
    for (int64_t v = 0; v < kKeys; v += L) simd::store(s + v, simd::exp(simd::sub(simd::load(s + v), simd::set1(m))));
    for (int64_t j = 0; j < kKeys; ++j)
      if (j < first || j >= n) s[j] = 0.f;
    alpha[h] = first_lane(simd::exp(simd::set1(row_max[h] - m)));
    row_max[h] = m;
  }
  for (int64_t h = 0; h < groups; h += 4) {          // each head's sum in key order, 4 heads side by side
    const float* s = scores + h * kKeys;
    float sum[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t j = 0; j < n; ++j)
      for (int i = 0; i < 4; ++i) sum[i] += s[std::min<int64_t>(i, groups - 1 - h) * kKeys + j];
    for (int64_t i = 0; i < std::min<int64_t>(4, groups - h); ++i)
      row_sum[h + i] = first_lane(simd::fmadd(simd::set1(row_sum[h + i]), simd::set1(alpha[h + i]), simd::set1(sum[i])));
  }
}

// The plan's decode rows, batch-invariant: q [T, H, D] float32 (scaled already); writes their rows of out.
// A work item is one decode row's KV head, longest context first over the threads.
template <typename T>
void invariant_decode(const StepPlan& plan, const AttentionOptions& options, const float* q, const T* k_cache,
                      const T* v_cache, int64_t dim, float* out) {
  const int64_t heads = plan.heads, kv_heads = plan.kv_heads, groups = heads / kv_heads, row = kv_heads * dim;
  const int64_t items = static_cast<int64_t>(plan.decode_order.size()) * kv_heads, window = options.window;
  if (items == 0) return;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> kt(dim * kKeys), scores(groups * kKeys), o(groups * dim), row_max(groups), row_sum(groups),
        alpha(groups);
    int64_t row_buffer[2][kKeys];
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = plan.decode_order[item / kv_heads], g = item % kv_heads;
      const int64_t context = plan.decode_contexts[b], pos = context - 1, block_size = plan.block_size;
      const int64_t* table = plan.decode_tables[b];
      const float* qg = q + (plan.decode_rows[b] * heads + g * groups) * dim;
      std::fill(o.begin(), o.end(), 0.f);
      std::fill(row_max.begin(), row_max.end(), std::numeric_limits<float>::lowest());
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      // The rows of the key block at k0 into rows; those of the next block are fetched one block early.
      auto block_rows = [&](int64_t k0, int64_t* rows) {
        for (int64_t j = 0, block = k0 / block_size, offset = k0 % block_size; j < std::min(kKeys, context - k0); ++j) {
          rows[j] = (table[block] * block_size + offset) * row + g * dim;
          if (++offset == block_size) offset = 0, ++block;
        }
      };
      const int64_t begin = window ? std::max<int64_t>(0, pos - window + 1) / kKeys * kKeys : 0;
      block_rows(begin, row_buffer[0]);
      for (int64_t k0 = begin, turn = 0; k0 < context; k0 += kKeys, turn ^= 1) {
        const int64_t n = std::min(kKeys, context - k0);
        const int64_t first = window ? std::max<int64_t>(0, pos - window + 1 - k0) : 0;   // the first key in the window
        const int64_t* rows = row_buffer[turn];
        if (k0 + kKeys < context) {
          int64_t* next = row_buffer[turn ^ 1];
          block_rows(k0 + kKeys, next);
          for (int64_t j = 0; j < std::min(kKeys, context - k0 - kKeys); ++j)
            for (int64_t i = 0; i < dim; i += 64 / static_cast<int64_t>(sizeof(T))) {
              simd::prefetch(k_cache + next[j] + i);
              simd::prefetch(v_cache + next[j] + i);
            }
        }
        gather_transposed(k_cache, rows, n, dim, kt.data());
        for_head_chunks(groups, [&](int64_t h, auto hc) {
          block_scores<decltype(hc)::value>(kt.data(), qg + h * dim, dim, scores.data() + h * kKeys);
        });
        block_softmax(scores.data(), groups, first, n, options.softcap, row_max.data(), row_sum.data(), alpha.data());
        weigh_all_values(v_cache, rows, n, scores.data(), kKeys, alpha.data(), o.data(), dim, groups);
      }
      for (int64_t h = 0; h < groups; ++h) {
        const float inverse = first_lane(simd::div(simd::set1(1.f), simd::set1(row_sum[h])));
        float* dst = out + (plan.decode_rows[b] * heads + g * groups + h) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = o[h * dim + d] * inverse;
      }
    }
  }
}

// The plan's decode rows: batch-invariant, or by lean attention.
template <typename T>
void decode_attention(StepPlan& plan, const AttentionOptions& options, const float* q, const T* k_cache,
                      const T* v_cache, int64_t dim, float* out) {
  if (plan.batch_invariant) invariant_decode<T>(plan, options, q, k_cache, v_cache, dim, out);
  else lean_decode<T>(plan, options, q, k_cache, v_cache, dim, out);
}

// -------------------------------------------------------------------------------- the attention step

// What happens to a step's q, k and v heads before the rotation: the projection's biases (Qwen2) and
// an RMSNorm of each query and key head (Qwen3, Gemma 3), in that order; null where a model has none.
struct HeadPrep {
  const float* bias = nullptr;                          // [(H + 2 Hkv) D], added to each row of qkv
  const float* q_norm = nullptr;                        // [D]
  const float* k_norm = nullptr;                        // [D]
  float eps = 0.f;
};

// The rotary embedding of a step's queries and keys in qkv [T, (H + 2 Hkv) D] (cos and signed sin
// [T, D], HF's rotate-half layout: x cos + roll(x, D/2) sin), after `prep`: queries into q [T, H, D],
// times `scale`; keys (rotated) and values into their cache slots, rounded as torch's cast rounds.
template <typename T>
void write_rotated(const float* qkv, const float* cos, const float* sin, const int64_t* slots, int64_t rows,
                   int64_t heads, int64_t kv_heads, int64_t dim, const HeadPrep& prep, float scale, float* q,
                   T* k_cache, T* v_cache) {
  constexpr int64_t L = simd::kLanes;
  const int64_t width = (heads + 2 * kv_heads) * dim, half = dim / 2;
  auto rotate = [&](const float* x, const float* c, const float* sn, float factor, auto* dst) {
    int64_t d = 0;
    if (half % L == 0)
      for (; d < dim; d += L) {
        const simd::Vec rolled = simd::mul(simd::load(x + (d + half) % dim), simd::load(sn + d));
        simd::store(dst + d, simd::mul(simd::fmadd(simd::load(x + d), simd::load(c + d), rolled), simd::set1(factor)));
      }
    using D = std::remove_pointer_t<decltype(dst)>;
    for (; d < dim; ++d) dst[d] = static_cast<D>((x[d] * c[d] + x[(d + half) % dim] * sn[d]) * factor);
  };
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> biased(prep.bias ? width : 0), normed(dim);
    auto normalized = [&](const float* x, const float* norm) {    // x, or its RMSNorm over the head
      if (!norm) return x;
      norm_row(x, norm, normed.data(), dim, prep.eps);
      return static_cast<const float*>(normed.data());
    };
    for (int64_t b = begin; b < end; ++b) {
      const float* row = qkv + b * width;
      if (prep.bias) {
        for_vectors(width, [&](int64_t i, int n) {
          store_n(biased.data() + i, simd::add(load_n(row + i, n), load_n(prep.bias + i, n)), n);
        });
        row = biased.data();
      }
      const float* cb = cos + b * dim;
      const float* sb = sin + b * dim;
      for (int64_t h = 0; h < heads; ++h)
        rotate(normalized(row + h * dim, prep.q_norm), cb, sb, scale, q + (b * heads + h) * dim);
      for (int64_t h = 0; h < kv_heads; ++h) {                // keys, rotated; values as they are
        rotate(normalized(row + (heads + h) * dim, prep.k_norm), cb, sb, 1.f,
               k_cache + (slots[b] * kv_heads + h) * dim);
        const float* value = row + (heads + kv_heads + h) * dim;
        T* v = v_cache + (slots[b] * kv_heads + h) * dim;
        for (int64_t d = 0; d < dim; d += L) simd::store(v + d, simd::load(value + d));
      }
    }
  });
}

inline void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t kv_heads, int64_t dim) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache and v_cache must be [num_blocks, block_size, Hkv, D] of one dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(k_cache.size(2) == kv_heads && k_cache.size(3) == dim, "the cache's heads do not match");
  TORCH_CHECK(dim % 16 == 0, "head_dim must be a multiple of 16");
  const auto t = k_cache.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "a float32, float16 or bfloat16 cache");
}

// Calls f(static_cast<T*>(nullptr)) with the cache's element type T.
template <typename F>
void with_cache_type(at::ScalarType type, F&& f) {
  if (type == at::kFloat) f(static_cast<float*>(nullptr));
  else if (type == at::kHalf) f(static_cast<c10::Half*>(nullptr));
  else f(static_cast<c10::BFloat16*>(nullptr));
}

// One layer's attention for the step, on float32 activations: biases and q/k norms, the rotary
// embedding, the new keys and values into the cache, prefill attention for the segments and
// decode_attention for the decode rows. qkv [T, (H + 2 Hkv) D]; returns [T, H D].
inline at::Tensor attention_step(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache, StepPlan& plan,
                                 const AttentionOptions& options, const HeadPrep& prep = {}) {
  const int64_t rows = qkv.size(0), dim = k_cache.size(3), heads = plan.heads;
  const at::Tensor x = qkv.contiguous(), c = cos.reshape({rows, dim}).contiguous(), s = sin.reshape({rows, dim}).contiguous();
  at::Tensor q = at::empty({rows, heads, dim}, at::kFloat), out = at::empty({rows, heads, dim}, at::kFloat);
  with_cache_type(k_cache.scalar_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    T* kd = static_cast<T*>(k_cache.data_ptr());
    T* vd = static_cast<T*>(v_cache.data_ptr());
    write_rotated<T>(x.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), plan.slots.data_ptr<int64_t>(), rows,
                     heads, plan.kv_heads, dim, prep, options.scale, q.data_ptr<float>(), kd, vd);
    decode_attention<T>(plan, options, q.data_ptr<float>(), kd, vd, dim, out.data_ptr<float>());
    prefill_attention<T>(plan, options, q.data_ptr<float>(), kd, vd, dim, out.data_ptr<float>());
  });
  return out.view({rows, heads * dim});
}

}  // namespace leanserve
