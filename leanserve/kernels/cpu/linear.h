// Quantized weight x float activation matrix product on integer dot products, for two weight formats:
//   int4: W[n, k] = q * scale + min, q in 0..15 (GGUF Q4_0 and Q4_1 blocks, as stored);
//   int8: W[n, k] = w * scale, w in -127..127 (GGUF Q8_0), stored as q = w + kInt8Offset with
//         min = -kInt8Offset * scale (simd.h: the offset is 128 where vpdpbusd multiplies, else 0);
// scale and min per group of G (a multiple of 32) along K, float16 values (exact for GGUF's).
// Activations are split, per block of 32 along K, into two int8 parts:
//     x ~ s * (hi + lo / 256),  s = max|x| / 127,  hi = round(x / s),  lo = round((x / s - hi) * 256),
// which keeps about 16 bits of each block (error <= max|x| / 65024, against bfloat16's 8 bits).
// The kernel computes W times that x exactly, up to float32 rounding: per block,
//     sum_k W x = scale * s * (q.hi + q.lo / 256) + min * s * (sum hi + sum lo / 256),
// the q.hi and q.lo dot products in int32 (simd::dot_int4, dot_int8), the rest in float32.
//
// Packed weight layout: tiles of kTile = simd::kLanes output rows; per tile and 32-k block, 8 byte
// vectors (simd::Bytes) that hold the tile's rows x 4 consecutive k that the dots multiply with one
// broadcast 4-byte group of x. int8: byte (v, i, j) = row i's q at k = 4v + j. int4: 4 vectors, that
// byte holds k = 4v + j in its low nibble and k = 16 + 4v + j in its high one.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace leanserve {

constexpr int64_t kTile = simd::kLanes, kBlock = 32, kRowChunk = 64;
// Activation rows a block's weights meet at once, and how many of their hi and lo dot products are
// interleaved: with 16 registers, interleaving spills; the core overlaps consecutive ones anyway.
constexpr int kRowBlock = simd::kRegisters == 32 ? 4 : 2, kChains = simd::kRegisters == 32 ? 2 * kRowBlock : 1;

// scales and mins [N, K / G] -> float16 [ceil(N / kTile), K / G, 2, kTile]: a tile's scales, then its
// mins, per group. Padded rows are 0.
inline at::Tensor pack_scales_mins(const at::Tensor& scales, const at::Tensor& mins) {
  const int64_t n = scales.size(0), groups = scales.size(1), tiles = (n + kTile - 1) / kTile;
  at::Tensor both = at::stack({scales.to(at::kHalf), mins.to(at::kHalf)}, 0);   // [2, N, G]
  both = at::constant_pad_nd(both, {0, 0, 0, tiles * kTile - n}, 0).view({2, tiles, kTile, groups});
  return both.permute({1, 3, 0, 2}).contiguous();
}

// q uint8 [N, K] -> [tiles, kTile rows i, blocks, quads, 4 j] with rows padded by 0.
inline at::Tensor tile_quads(const at::Tensor& q) {
  const int64_t n = q.size(0), k = q.size(1), tiles = (n + kTile - 1) / kTile;
  TORCH_CHECK(q.scalar_type() == at::kByte && k % kBlock == 0, "q must be uint8 [N, K], K a multiple of 32");
  return at::constant_pad_nd(q, {0, 0, 0, tiles * kTile - n}, 0).view({tiles, kTile, k / kBlock, 8, 4});
}

// q uint8 [N, K] (values 0..15), scales and mins [N, K / G] -> (packed uint8 [tiles, K / 32, 16 kTile],
// scales and mins).
inline std::vector<at::Tensor> pack_int4(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& mins) {
  at::Tensor t = tile_quads(q);                                     // quads 0-3: low nibbles, 4-7: high
  t = t.view({t.size(0), kTile, t.size(2), 2, 4, 4}).permute({0, 2, 4, 1, 5, 3});   // [T, blocks, v, i, j, half]
  at::Tensor packed = at::bitwise_or(t.select(-1, 0), t.select(-1, 1) * 16).contiguous();
  return {packed.view({packed.size(0), packed.size(1), 16 * kTile}), pack_scales_mins(scales, mins)};
}

// w int8 [N, K], scales [N, K / G] -> (packed uint8 [tiles, K / 32, 32 kTile] of w + kInt8Offset, scales
// and mins = -kInt8Offset * scales).
inline std::vector<at::Tensor> pack_int8(const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(w.scalar_type() == at::kChar, "w must be int8");
  const at::Tensor q = simd::kInt8Offset ? (w.to(at::kShort) + simd::kInt8Offset).to(at::kByte) : w.view(at::kByte);
  const at::Tensor packed = tile_quads(q).permute({0, 2, 3, 1, 4}).contiguous();  // [T, blocks, v, i, j]
  return {packed.view({packed.size(0), packed.size(1), 32 * kTile}), pack_scales_mins(scales, scales * -simd::kInt8Offset)};
}

// Activations x [rows, K] -> int8 hi and lo parts, a block's 32 hi bytes then its 32 lo bytes
// (xq [rows, blocks, 2, 32]), and per block its s and s * (sum hi + sum lo / 256) (xs [rows, blocks, 2]).
inline void quantize_rows(const float* x, int64_t rows, int64_t in_features, int8_t* xq, float* xs) {
  constexpr int kVecs = kBlock / simd::kLanes;
  const int64_t blocks = in_features / kBlock;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      for (int64_t b = 0; b < blocks; ++b) {
        const float* v = x + m * in_features + b * kBlock;
        int8_t* hi = xq + (m * blocks + b) * 2 * kBlock;
        simd::Vec parts[kVecs], top = simd::zero();
        for (int i = 0; i < kVecs; ++i) {
          parts[i] = simd::load(v + i * simd::kLanes);
          top = simd::max(top, simd::abs(parts[i]));
        }
        const float amax = simd::reduce_max(top);
        const float inv = amax > 0.f ? 127.f / amax : 0.f, s = amax / 127.f;
        simd::Vec sums = simd::zero();        // 256 hi + lo, summed over the block (integers below 2^24: exact)
        for (int i = 0; i < kVecs; ++i) {     // u = x / s; hi = round(u); lo = round((u - hi) 256)
          const simd::Vec u = simd::mul(parts[i], simd::set1(inv));
          const simd::Vec h = simd::round(u);
          const simd::Vec l = simd::min(simd::max(simd::round(simd::mul(simd::sub(u, h), simd::set1(256.f))),
                                                  simd::set1(-127.f)), simd::set1(127.f));
          simd::store_int8(hi + i * simd::kLanes, h);
          simd::store_int8(hi + kBlock + i * simd::kLanes, l);
          sums = simd::add(sums, simd::fmadd(h, simd::set1(256.f), l));
        }
        xs[(m * blocks + b) * 2] = s;
        xs[(m * blocks + b) * 2 + 1] = s * (simd::reduce_add(sums) / 256.f);
      }
    }
  });
}

// One 32-k block of a tile (its 8 unpacked weight vectors in q) times R activation rows from `row`,
// added to acc[row..] (written there for the first block): the hi and lo parts of R rows are 2R
// independent dot products, which hides the instructions' latency.
template <int Bits, int R, bool First>
inline void block_rows(const simd::Bytes* q, simd::Vec scale, simd::Vec min, const int8_t* xq, const float* xs,
                       int64_t row, int64_t b, int64_t blocks, simd::Vec* acc) {
  const int8_t* parts[2 * R];         // each row's hi and lo bytes
  for (int r = 0; r < R; ++r) {
    parts[2 * r] = xq + ((row + r) * blocks + b) * 2 * kBlock;
    parts[2 * r + 1] = parts[2 * r] + kBlock;
  }
  simd::Ints dots[2 * R];
  constexpr int chains = std::min(kChains, 2 * R);
  for (int n = 0; n < 2 * R; n += chains) {
    if constexpr (Bits == 4)
      simd::dot_int4<chains>(q, parts + n, dots + n);
    else
      simd::dot_int8<chains>(q, parts + n, dots + n);
  }
  for (int r = 0; r < R; ++r) {
    const float* s = xs + ((row + r) * blocks + b) * 2;
    const simd::Vec dot = simd::fmadd(simd::to_float(dots[2 * r + 1]), simd::set1(1.f / 256.f), simd::to_float(dots[2 * r]));
    const simd::Vec before = First ? simd::zero() : acc[row + r];
    acc[row + r] = simd::fmadd(simd::mul(scale, simd::set1(s[0])), dot, before);
    acc[row + r] = simd::fmadd(min, simd::set1(s[1]), acc[row + r]);
  }
}

// Tile t times `rows` (at most kRowChunk) rows of quantized activations (xq, xs), into y [rows, N].
template <int Bits>
inline void tile_rows(int64_t t, int64_t rows, const uint8_t* packed, const c10::Half* scales_mins, const int8_t* xq,
                      const float* xs, int64_t in_features, int64_t group, int64_t out_features, float* y) {
  const int64_t blocks = in_features / kBlock, groups = in_features / group;
  constexpr int64_t bytes = kBlock * kTile * Bits / 8, vector = 4 * kTile;
  simd::Vec acc[kRowChunk];
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* w = packed + (t * blocks + b) * bytes;
    simd::Bytes q[8];
    for (int64_t line = 0; line < bytes; line += 64) simd::prefetch(w + 16 * bytes + line);
    for (int v = 0; v < Bits; ++v) {
      const simd::Bytes raw = simd::load_bytes(w + vector * v);
      if constexpr (Bits == 8) {
        q[v] = raw;
      } else {
        q[v] = simd::low_nibbles(raw);
        q[v + 4] = simd::high_nibbles(raw);
      }
    }
    const c10::Half* sm = scales_mins + 2 * (t * groups + b * kBlock / group) * kTile;
    const simd::Vec scale = simd::load(sm), min = simd::load(sm + kTile);
    auto all_rows = [&](auto first) {
      constexpr bool kFirst = decltype(first)::value;
      int64_t m = 0;
      for (; m + kRowBlock <= rows; m += kRowBlock)
        block_rows<Bits, kRowBlock, kFirst>(q, scale, min, xq, xs, m, b, blocks, acc);
      for (; m < rows; ++m) block_rows<Bits, 1, kFirst>(q, scale, min, xq, xs, m, b, blocks, acc);
    };
    if (b == 0)
      all_rows(std::true_type());
    else
      all_rows(std::false_type());
  }
  const int64_t n0 = t * kTile, valid = std::min(kTile, out_features - n0);
  for (int64_t m = 0; m < rows; ++m) {
    if (valid == kTile)
      simd::store(y + m * out_features + n0, acc[m]);
    else
      simd::store_partial(y + m * out_features + n0, acc[m], static_cast<int>(valid));
  }
}

// y [M, N] float32 = x [M, K] float32 times the packed weight (int4 or int8, told apart by its block size).
inline at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales_mins,
                               int64_t group, int64_t out_features) {
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && (packed.size(2) == 16 * kTile || packed.size(2) == 32 * kTile),
              "quant_linear: bad shapes (or weights packed by another ISA level's kernels)");
  const int64_t rows = x.size(0), in_features = x.size(1), blocks = in_features / kBlock;
  const int64_t tiles = packed.size(0);
  TORCH_CHECK(in_features % kBlock == 0 && packed.size(1) == blocks && group % kBlock == 0 && in_features % group == 0 &&
                  scales_mins.size(1) == in_features / group && tiles * kTile >= out_features,
              "quant_linear: the weight does not fit x");
  at::Tensor xq = at::empty({rows, blocks, 2, kBlock}, at::kChar);
  at::Tensor xs = at::empty({rows, blocks, 2}, at::kFloat);
  quantize_rows(x.data_ptr<float>(), rows, in_features, xq.data_ptr<int8_t>(), xs.data_ptr<float>());
  at::Tensor y = at::empty({rows, out_features}, at::kFloat);
  float* yd = y.data_ptr<float>();
  const uint8_t* pd = packed.data_ptr<uint8_t>();
  const c10::Half* smd = scales_mins.data_ptr<c10::Half>();
  const int8_t* xqd = xq.data_ptr<int8_t>();
  const float* xsd = xs.data_ptr<float>();
  const bool int4 = packed.size(2) == 16 * kTile;
  // Row chunks keep their activations in cache while every tile passes over them.
  for (int64_t m0 = 0; m0 < rows; m0 += kRowChunk) {
    const int64_t chunk = std::min(kRowChunk, rows - m0);
    const int8_t* xq_chunk = xqd + m0 * 2 * in_features;
    const float* xs_chunk = xsd + m0 * blocks * 2;
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (int4)
          tile_rows<4>(t, chunk, pd, smd, xq_chunk, xs_chunk, in_features, group, out_features, yd + m0 * out_features);
        else
          tile_rows<8>(t, chunk, pd, smd, xq_chunk, xs_chunk, in_features, group, out_features, yd + m0 * out_features);
      }
    });
  }
  return y;
}

}  // namespace leanserve
