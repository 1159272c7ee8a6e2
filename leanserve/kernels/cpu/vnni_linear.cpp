// Quantized weight x float activation matrix product on AVX-512 VNNI integer dot products
// (compiled with kernels.cpp by leanserve/kernels/cpu_kernels.py), for two weight formats:
//   int4: W[n, k] = q * scale + min, q in 0..15;
//   int8: W[n, k] = w * scale, w in -127..127 (GGUF Q8_0), stored as q = w + 128 with min = -128 * scale;
// scale and min per group of G = 32, 64 or 128 along K, float16 values (exact for GGUF's).
// Activations are split, per block of 32 along K, into two int8 parts:
//     x ~ s * (hi + lo / 256),  s = max|x| / 127,  hi = round(x / s),  lo = round((x / s - hi) * 256),
// which keeps about 16 bits of each block (error <= max|x| / 65024, against bfloat16's 8 bits).
// The kernel computes W times that x exactly, up to float32 rounding: per block,
//     sum_k W x = scale * s * (q.hi + q.lo / 256) + min * s * (sum hi + sum lo / 256),
// the q.hi and q.lo dot products in int32 (vpdpbusd: unsigned q times signed x parts, 64
// multiply-adds an instruction), the rest in float32.
//
// Packed weight layout: tiles of 16 output rows; per tile and 32-k block, vectors of 64 bytes
// that hold the 16 rows x 4 consecutive k that vpdpbusd multiplies with one broadcast 4-byte
// group of x. int8: 8 vectors, byte (v, i, j) = row i's q at k = 4v + j. int4: 4 vectors, that
// byte holds k = 4v + j in its low nibble and k = 16 + 4v + j in its high one, so masking or
// shifting a vector gives the 8 int8-layout vectors.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define LEANSERVE_VNNI 1
#endif

namespace {

constexpr int64_t kTile = 16, kBlock = 32, kRowChunk = 64;

// scales and mins [N, K / G] -> float16 [ceil(N / 16), K / G, 2, 16]: a tile's 16 scales, then its
// 16 mins, one cache line per group. Padded rows are 0.
torch::Tensor pack_scales_mins(torch::Tensor scales, torch::Tensor mins) {
  const int64_t n = scales.size(0), groups = scales.size(1), tiles = (n + kTile - 1) / kTile;
  torch::Tensor both = torch::stack({scales.to(torch::kHalf), mins.to(torch::kHalf)}, 0);   // [2, N, G]
  both = torch::constant_pad_nd(both, {0, 0, 0, tiles * kTile - n}, 0).view({2, tiles, kTile, groups});
  return both.permute({1, 3, 0, 2}).contiguous();
}

// q uint8 [N, K] -> [T, 16 rows i, blocks, quads, 4 j] with rows padded by 0.
torch::Tensor tile_quads(torch::Tensor q) {
  const int64_t n = q.size(0), k = q.size(1), tiles = (n + kTile - 1) / kTile;
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && k % kBlock == 0, "q must be uint8 [N, K], K a multiple of 32");
  return torch::constant_pad_nd(q, {0, 0, 0, tiles * kTile - n}, 0).view({tiles, kTile, k / kBlock, 8, 4});
}


#ifdef LEANSERVE_VNNI
// One 32-k block of a 16-row tile (unpacked in q) times R activation rows from `row`, added to
// acc[row..] (written there for the first block). R rows give 2R independent vpdpbusd chains,
// which hides the instruction's latency; a lone row splits each dot product in two (even and odd
// 4-k groups) for the same reason.
template <int R, bool First, int C = (R == 1 ? 2 : 1)>
inline void block_rows(const __m512i* q, __m512 scale, __m512 min, const int8_t* xq, const float* xs,
                       int64_t row, int64_t b, int64_t in_features, int64_t blocks, __m512* acc) {
  __m512i dot_hi[R][C], dot_lo[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) dot_hi[r][c] = dot_lo[r][c] = _mm512_setzero_si512();
  for (int v = 0; v < 8; ++v) {
    for (int r = 0; r < R; ++r) {
      const int8_t* xh = xq + (row + r) * 2 * in_features + b * 2 * kBlock + 4 * v;
      int32_t h4, l4;
      std::memcpy(&h4, xh, 4);
      std::memcpy(&l4, xh + kBlock, 4);
      dot_hi[r][v % C] = _mm512_dpbusd_epi32(dot_hi[r][v % C], q[v], _mm512_set1_epi32(h4));
      dot_lo[r][v % C] = _mm512_dpbusd_epi32(dot_lo[r][v % C], q[v], _mm512_set1_epi32(l4));
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 1; c < C; ++c) {
      dot_hi[r][0] = _mm512_add_epi32(dot_hi[r][0], dot_hi[r][c]);
      dot_lo[r][0] = _mm512_add_epi32(dot_lo[r][0], dot_lo[r][c]);
    }
    const float* s = xs + ((row + r) * blocks + b) * 2;
    const __m512 hi = _mm512_cvtepi32_ps(dot_hi[r][0]), lo = _mm512_cvtepi32_ps(dot_lo[r][0]);
    const __m512 dot = _mm512_fmadd_ps(lo, _mm512_set1_ps(1.f / 256.f), hi);
    const __m512 before = First ? _mm512_setzero_ps() : acc[row + r];
    acc[row + r] = _mm512_fmadd_ps(_mm512_mul_ps(scale, _mm512_set1_ps(s[0])), dot, before);
    acc[row + r] = _mm512_fmadd_ps(min, _mm512_set1_ps(s[1]), acc[row + r]);
  }
}

// Tile t times `rows` (at most kRowChunk) rows of quantized activations (xq, xs), into y [rows, N].
template <int Bits>
inline void tile_rows(int64_t t, int64_t rows, const uint8_t* packed, const at::Half* scales_mins,
                      const int8_t* xq, const float* xs, int64_t in_features, int64_t group, int64_t out_features,
                      float* y) {
  const int64_t blocks = in_features / kBlock, groups = in_features / group;
  __m512 acc[kRowChunk];
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    constexpr int64_t bytes = kBlock * kTile * Bits / 8, prefetch = 16 * bytes;
    const uint8_t* w = packed + (t * blocks + b) * bytes;
    __m512i q[8];
    for (int v = 0; v < Bits; ++v) {
      _mm_prefetch(reinterpret_cast<const char*>(w + prefetch + 64 * v), _MM_HINT_T0);
      const __m512i raw = _mm512_loadu_si512(w + 64 * v);
      if constexpr (Bits == 8) {
        q[v] = raw;
      } else {
        q[v] = _mm512_and_si512(raw, nibble);
        q[v + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
      }
    }
    const int64_t g = (t * groups + b * kBlock / group) * kTile;
    const at::Half* sm = scales_mins + 2 * g;
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm)));
    const __m512 min = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm + kTile)));
    auto all_rows = [&](auto first) {
      constexpr bool kFirst = decltype(first)::value;
      int64_t m = 0;
      for (; m + 4 <= rows; m += 4) block_rows<4, kFirst>(q, scale, min, xq, xs, m, b, in_features, blocks, acc);
      for (; m < rows; ++m) block_rows<1, kFirst>(q, scale, min, xq, xs, m, b, in_features, blocks, acc);
    };
    if (b == 0)
      all_rows(std::true_type());
    else
      all_rows(std::false_type());
  }
  const int64_t n0 = t * kTile, valid = std::min(kTile, out_features - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  for (int64_t m = 0; m < rows; ++m) _mm512_mask_storeu_ps(y + m * out_features + n0, mask, acc[m]);
}
#endif

}  // namespace

bool vnni_available() {
#ifdef LEANSERVE_VNNI
  return true;
#else
  return false;
#endif
}

// q uint8 [N, K] (values 0..15), scales and mins [N, K / G] -> (packed uint8 [ceil(N / 16), K / 32, 256],
// scales and mins).
std::vector<torch::Tensor> int4_vnni_pack(torch::Tensor q, torch::Tensor scales, torch::Tensor mins) {
  torch::Tensor t = tile_quads(q);                              // quads 0-3: low nibbles, 4-7: high
  t = t.view({t.size(0), kTile, t.size(2), 2, 4, 4}).permute({0, 2, 4, 1, 5, 3});   // [T, blocks, v, i, j, half]
  torch::Tensor packed = (t.select(-1, 0) | t.select(-1, 1) * 16).contiguous();
  return {packed.view({packed.size(0), packed.size(1), 256}), pack_scales_mins(scales, mins)};
}

// w int8 [N, K], scales [N, K / G] -> (packed uint8 [ceil(N / 16), K / 32, 512] of w + 128, scales
// and mins = -128 * scales).
std::vector<torch::Tensor> int8_vnni_pack(torch::Tensor w, torch::Tensor scales) {
  TORCH_CHECK(w.scalar_type() == torch::kInt8, "w must be int8");
  torch::Tensor q = (w.to(torch::kInt16) + 128).to(torch::kUInt8);
  torch::Tensor packed = tile_quads(q).permute({0, 2, 3, 1, 4}).contiguous();     // [T, blocks, v, i, j]
  return {packed.view({packed.size(0), packed.size(1), 512}), pack_scales_mins(scales, scales * -128)};
}

// y [M, N] float32 = x [M, K] times the packed weight (int4 or int8, told apart by its block size).
torch::Tensor vnni_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales_mins, int64_t group,
                          int64_t out_features) {
#ifndef LEANSERVE_VNNI
  TORCH_CHECK(false, "vnni_linear needs AVX-512 VNNI");
#else
  x = x.to(torch::kFloat32).contiguous();
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && (packed.size(2) == 256 || packed.size(2) == 512), "bad shapes");
  const int64_t rows = x.size(0), in_features = x.size(1), blocks = in_features / kBlock;
  const int64_t tiles = packed.size(0), groups = in_features / group;
  TORCH_CHECK(packed.size(1) == blocks && group % kBlock == 0 && scales_mins.size(1) == groups &&
              tiles * kTile >= out_features, "weight does not fit x");

  // Activations -> int8 hi and lo parts, per block their scale s and s * (sum hi + sum lo / 256).
  // A block's 32 hi bytes and 32 lo bytes share one cache line: [rows, blocks, hi and lo, 32].
  torch::Tensor xq = torch::empty({rows, blocks, 2, kBlock}, torch::kInt8);
  torch::Tensor xs = torch::empty({rows, blocks, 2}, torch::kFloat32);
  const float* xd = x.data_ptr<float>();
  int8_t* xqd = xq.data_ptr<int8_t>();
  float* xsd = xs.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      for (int64_t b = 0; b < blocks; ++b) {
        const float* v = xd + m * in_features + b * kBlock;
        int8_t* hi = xqd + m * 2 * in_features + b * 2 * kBlock;
        int8_t* lo = hi + kBlock;
        const __m512 x0 = _mm512_loadu_ps(v), x1 = _mm512_loadu_ps(v + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        const float inv = amax > 0.f ? 127.f / amax : 0.f, s = amax / 127.f;
        __m512i sums = _mm512_setzero_si512();     // 256 hi + lo, summed over the block (exact in int32)
        for (int half = 0; half < 2; ++half) {       // u = x / s; hi = round(u); lo = round((u - hi) 256)
          constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
          const __m512 u = _mm512_mul_ps(half ? x1 : x0, _mm512_set1_ps(inv));
          const __m512 h = _mm512_roundscale_ps(u, nearest);
          const __m512 l = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(
              _mm512_mul_ps(_mm512_sub_ps(u, h), _mm512_set1_ps(256.f)), nearest), _mm512_set1_ps(-127.f)),
              _mm512_set1_ps(127.f));
          const __m512i hi32 = _mm512_cvtps_epi32(h), lo32 = _mm512_cvtps_epi32(l);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + 16 * half), _mm512_cvtsepi32_epi8(hi32));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + 16 * half), _mm512_cvtsepi32_epi8(lo32));
          sums = _mm512_add_epi32(sums, _mm512_add_epi32(_mm512_slli_epi32(hi32, 8), lo32));
        }
        xsd[(m * blocks + b) * 2] = s;
        xsd[(m * blocks + b) * 2 + 1] = s * (static_cast<float>(_mm512_reduce_add_epi32(sums)) / 256.f);
      }
    }
  });

  torch::Tensor y = torch::empty({rows, out_features}, torch::kFloat32);
  float* yd = y.data_ptr<float>();
  const uint8_t* pd = packed.data_ptr<uint8_t>();
  const at::Half* smd = scales_mins.data_ptr<at::Half>();
  // Row chunks keep their activations in cache while every tile passes over them.
  for (int64_t m0 = 0; m0 < rows; m0 += kRowChunk) {
    const int64_t chunk = std::min(kRowChunk, rows - m0);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int8_t* xq_chunk = xqd + m0 * 2 * in_features;
        const float* xs_chunk = xsd + m0 * blocks * 2;
        if (packed.size(2) == 256)
          tile_rows<4>(t, chunk, pd, smd, xq_chunk, xs_chunk, in_features, group, out_features, yd + m0 * out_features);
        else
          tile_rows<8>(t, chunk, pd, smd, xq_chunk, xs_chunk, in_features, group, out_features, yd + m0 * out_features);
      }
    });
  }
  return y;
#endif
}
