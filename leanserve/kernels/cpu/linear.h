// Quantized weight x float activation matrix product on integer dot products, for two byte formats:
//   int4: W[n, k] = q * scale + min, q in 0..15, two a byte (GGUF Q4_0, Q4_1, Q4_K);
//   int8: W[n, k] = w * scale + min, w an int8 (GGUF Q8_0: w; Q5_0: q - 16; Q5_1, Q5_K: q, 0..31;
//         Q6_K: q - 32). Where vpdpbusd multiplies (unsigned weight bytes, simd::kInt8Offset 128),
//         a row with a negative w is stored as w + 128 with min - 128 * scale; other rows, and every
//         row on the pmaddubsw levels (signed weight bytes), as w: 0..127 reads the same either way.
// scale and min per group of G along K: G = 16 (Q6_K's sub-blocks, two groups in a block of 32) or a
// multiple of 32. They are packed as float16 where every one is a float16 value (GGUF's d and m: half
// the traffic of float32), else as float32, which holds the K-quants' sub-block scales d * sc and
// mins dmin * m exactly (float16 times a 6-bit integer: 17 bits).
// Activations are split, per block of 32 along K, into two int8 parts:
//     x ~ s * (hi + lo / 256),  s = max|x| / 127,  hi = round(x / s),  lo = round((x / s - hi) * 256),
// which keeps about 16 bits of each block (error <= max|x| / 65024, against bfloat16's 8 bits).
// The kernel computes W times that x exactly, up to float32 rounding: per group g of a block,
//     sum_g W x = scale * s * (q.hi + q.lo / 256) + min * s * (sum hi + sum lo / 256),
// the q.hi and q.lo dot products in int32 (simd::dot_int4, dot_int8), the rest in float32; a block
// of group 16 is two such sums, over its first and its last 16 k.
//
// Packed weight layout: tiles of kTile = simd::kLanes output rows; per tile and 32-k block, 8 byte
// vectors (simd::Bytes) that hold the tile's rows x 4 consecutive k that the dots multiply with one
// broadcast 4-byte group of x. int8: byte (v, i, j) = row i's q at k = 4v + j. int4: 4 vectors, that
// byte holds k = 4v + j in its low nibble and k = 16 + 4v + j in its high one. Either way unpacked
// vectors 0-3 hold k 0..15 and 4-7 k 16..31: the two halves of a group-16 block.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace leanserve {

constexpr int64_t kTile = simd::kLanes, kBlock = 32, kRowChunk = 64;
// Activation rows a block's weights meet at once, and how many of their hi and lo dot products are
// interleaved: with 16 registers, interleaving spills; the core overlaps consecutive ones anyway.
constexpr int kRowBlock = simd::kRegisters == 32 ? 4 : 2, kChains = simd::kRegisters == 32 ? 2 * kRowBlock : 1;
// Per activation row and block: s, then s * (sum hi + sum lo / 256) over the block, its first 16 k
// and its last 16 k (the min terms of group 32 and up, and of group 16).
constexpr int kSums = 4;

// scales and mins [N, K / G] (any float type) -> [ceil(N / kTile), K / G, 2, kTile]: a tile's scales,
// then its mins, per group; float16 where every value is one, else float32. Padded rows are 0.
inline at::Tensor pack_scales_mins(const at::Tensor& scales, const at::Tensor& mins) {
  TORCH_CHECK(scales.dim() == 2 && scales.sizes() == mins.sizes(), "scales and mins must be [N, K / G]");
  const int64_t n = scales.size(0), groups = scales.size(1), tiles = (n + kTile - 1) / kTile;
  at::Tensor both = at::stack({scales.to(at::kDouble), mins.to(at::kDouble)}, 0);   // [2, N, G]
  const auto holds = [&](at::ScalarType type) { return at::equal(both.to(type).to(at::kDouble), both); };
  const at::ScalarType type = holds(at::kHalf) ? at::kHalf : at::kFloat;
  TORCH_CHECK(type == at::kHalf || holds(at::kFloat), "scales and mins must be (finite) float32 values");
  both = at::constant_pad_nd(both.to(type), {0, 0, 0, tiles * kTile - n}, 0).view({2, tiles, kTile, groups});
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

// w int8 [N, K], scales and mins (default 0) [N, K / G] -> (packed uint8 [tiles, K / 32, 32 kTile], scales
// and mins), rows with a negative w shifted by kInt8Offset (the top): their min - kInt8Offset * scale
// is worked out in float64 and must be a float32 value (it is for min 0: Q8_0, Q6_K).
inline std::vector<at::Tensor> pack_int8(const at::Tensor& w, const at::Tensor& scales,
                                         const std::optional<at::Tensor>& mins_or_none) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, "w must be int8 [N, K]");
  at::Tensor mins = mins_or_none ? mins_or_none->to(at::kDouble) : at::zeros(scales.sizes(), at::kDouble);
  at::Tensor q = w.view(at::kByte);
  if (simd::kInt8Offset) {
    const at::Tensor shifted = (w < 0).any(1, true);                                 // [N, 1]
    q = (w.to(at::kShort) + shifted.to(at::kShort) * simd::kInt8Offset).to(at::kByte);
    mins = mins - shifted.to(at::kDouble) * simd::kInt8Offset * scales.to(at::kDouble);
  }
  const at::Tensor packed = tile_quads(q.contiguous()).permute({0, 2, 3, 1, 4}).contiguous();  // [T, blocks, v, i, j]
  return {packed.view({packed.size(0), packed.size(1), 32 * kTile}), pack_scales_mins(scales, mins)};
}

// The packed weight's checks (the kernel's and the executor's Linear): group 16 or a multiple of 32.
inline void check_packed(const at::Tensor& packed, const at::Tensor& scales_mins, int64_t group, int64_t out_features) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 &&
                  (packed.size(2) == 16 * kTile || packed.size(2) == 32 * kTile),
              "quant_linear: not a packed weight (or one packed by another ISA level's kernels)");
  TORCH_CHECK((scales_mins.scalar_type() == at::kHalf || scales_mins.scalar_type() == at::kFloat) &&
                  scales_mins.dim() == 4 && scales_mins.size(0) == packed.size(0) && scales_mins.size(2) == 2 &&
                  scales_mins.size(3) == kTile && scales_mins.is_contiguous(),
              "quant_linear: scales_mins must be float16 or float32 [tiles, K / G, 2, kTile] (pack_int4, pack_int8)");
  TORCH_CHECK((group == 16 || (group > 0 && group % kBlock == 0)) &&
                  scales_mins.size(1) * group == packed.size(1) * kBlock,
              "quant_linear: groups of ", group, " (16 or a multiple of 32) do not fit the packed weight");
  TORCH_CHECK(out_features > 0 && packed.size(0) == (out_features + kTile - 1) / kTile,
              "quant_linear: ", out_features, " output rows do not fit ", packed.size(0), " tiles");
}

// Activations x [rows, K] -> int8 hi and lo parts, a block's 32 hi bytes then its 32 lo bytes
// (xq [rows, blocks, 2, 32]), and per block its kSums sums (xs [rows, blocks, kSums]).
inline void quantize_rows(const float* x, int64_t rows, int64_t in_features, int8_t* xq, float* xs) {
  constexpr int kVecs = kBlock / simd::kLanes;      // 2 or 4: the first half of them hold k 0..15
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
        simd::Vec sums[2] = {simd::zero(), simd::zero()};   // 256 hi + lo, per half (integers below 2^24: exact)
        for (int i = 0; i < kVecs; ++i) {     // u = x / s; hi = round(u); lo = round((u - hi) 256)
          const simd::Vec u = simd::mul(parts[i], simd::set1(inv));
          const simd::Vec h = simd::round(u);
          const simd::Vec l = simd::min(simd::max(simd::round(simd::mul(simd::sub(u, h), simd::set1(256.f))),
                                                  simd::set1(-127.f)), simd::set1(127.f));
          simd::store_int8(hi + i * simd::kLanes, h);
          simd::store_int8(hi + kBlock + i * simd::kLanes, l);
          sums[2 * i / kVecs] = simd::add(sums[2 * i / kVecs], simd::fmadd(h, simd::set1(256.f), l));
        }
        const float first = simd::reduce_add(sums[0]), last = simd::reduce_add(sums[1]);
        float* out = xs + (m * blocks + b) * kSums;
        out[0] = s;
        out[1] = s * ((first + last) / 256.f);
        out[2] = s * (first / 256.f);
        out[3] = s * (last / 256.f);
      }
    }
  });
}

// One 32-k block of a tile (its 8 unpacked weight vectors in q; scale_min: the scale and min vectors
// of its group, or of its two groups of 16 with Halves) times R activation rows from `row`, added to
// acc[row..] (written there for the first block): the hi and lo parts of R rows are 2R independent
// dot products, which hides the instructions' latency.
template <int Bits, int R, bool First, bool Halves>
inline void block_rows(const simd::Bytes* q, const simd::Vec* scale_min, const int8_t* xq, const float* xs,
                       int64_t row, int64_t b, int64_t blocks, simd::Vec* acc) {
  constexpr int kGroups = Halves ? 2 : 1, kVectors = 8 / kGroups;   // groups in the block, byte vectors each
  const int8_t* parts[2 * R];         // each row's hi and lo bytes (of the group)
  for (int r = 0; r < R; ++r) {
    parts[2 * r] = xq + ((row + r) * blocks + b) * 2 * kBlock;
    parts[2 * r + 1] = parts[2 * r] + kBlock;
  }
  constexpr int chains = std::min(kChains, 2 * R);
  for (int g = 0; g < kGroups; ++g) {
    simd::Ints dots[2 * R];
    for (int n = 0; n < 2 * R; n += chains) {
      if constexpr (Bits == 4)
        simd::dot_int4<chains, kVectors>(q + g * kVectors, parts + n, dots + n);
      else
        simd::dot_int8<chains, kVectors>(q + g * kVectors, parts + n, dots + n);
    }
    for (int r = 0; r < R; ++r) {
      const float* s = xs + ((row + r) * blocks + b) * kSums;
      const simd::Vec dot =
          simd::fmadd(simd::to_float(dots[2 * r + 1]), simd::set1(1.f / 256.f), simd::to_float(dots[2 * r]));
      const simd::Vec before = First && g == 0 ? simd::zero() : acc[row + r];
      acc[row + r] = simd::fmadd(simd::mul(scale_min[2 * g], simd::set1(s[0])), dot, before);
      acc[row + r] = simd::fmadd(scale_min[2 * g + 1], simd::set1(s[Halves ? 2 + g : 1]), acc[row + r]);
    }
    for (int i = 0; i < 2 * R; ++i) parts[i] += 4 * kVectors;     // the next group's activations
  }
}

// Tile t times `rows` (at most kRowChunk) rows of quantized activations (xq, xs), into y [rows, N];
// scales and mins of type S (c10::Half or float), groups of 16 (Halves) or a multiple of 32.
template <int Bits, typename S, bool Halves>
inline void tile_rows(int64_t t, int64_t rows, const uint8_t* packed, const S* scales_mins, const int8_t* xq,
                      const float* xs, int64_t in_features, int64_t group, int64_t out_features, float* y) {
  const int64_t blocks = in_features / kBlock, groups = in_features / group;
  constexpr int64_t bytes = kBlock * kTile * Bits / 8, vector = 4 * kTile;
  constexpr int kGroups = Halves ? 2 : 1;
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
    const S* sm = scales_mins + 2 * (t * groups + (Halves ? 2 * b : b * kBlock / group)) * kTile;
    simd::Vec scale_min[2 * kGroups];
    for (int i = 0; i < 2 * kGroups; ++i) scale_min[i] = simd::load(sm + i * kTile);
    auto all_rows = [&](auto first) {
      constexpr bool kFirst = decltype(first)::value;
      int64_t m = 0;
      for (; m + kRowBlock <= rows; m += kRowBlock)
        block_rows<Bits, kRowBlock, kFirst, Halves>(q, scale_min, xq, xs, m, b, blocks, acc);
      for (; m < rows; ++m) block_rows<Bits, 1, kFirst, Halves>(q, scale_min, xq, xs, m, b, blocks, acc);
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

// Every tile times every row, in chunks of rows that keep their activations in cache while every
// tile passes over them.
template <int Bits, typename S, bool Halves>
inline void all_tiles(int64_t rows, int64_t tiles, const uint8_t* packed, const S* scales_mins, const int8_t* xq,
                      const float* xs, int64_t in_features, int64_t group, int64_t out_features, float* y) {
  const int64_t blocks = in_features / kBlock;
  for (int64_t m0 = 0; m0 < rows; m0 += kRowChunk) {
    const int64_t chunk = std::min(kRowChunk, rows - m0);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        tile_rows<Bits, S, Halves>(t, chunk, packed, scales_mins, xq + m0 * 2 * in_features, xs + m0 * blocks * kSums,
                                   in_features, group, out_features, y + m0 * out_features);
    });
  }
}

// y [M, N] float32 = x [M, K] float32 times the packed weight (int4 or int8, told apart by its block size).
inline at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales_mins,
                               int64_t group, int64_t out_features) {
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  check_packed(packed, scales_mins, group, out_features);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == packed.size(1) * kBlock, "quant_linear: x [M, K] does not fit the weight");
  const int64_t rows = x.size(0), in_features = x.size(1), blocks = in_features / kBlock, tiles = packed.size(0);
  at::Tensor xq = at::empty({rows, blocks, 2, kBlock}, at::kChar);
  at::Tensor xs = at::empty({rows, blocks, kSums}, at::kFloat);
  quantize_rows(x.data_ptr<float>(), rows, in_features, xq.data_ptr<int8_t>(), xs.data_ptr<float>());
  at::Tensor y = at::empty({rows, out_features}, at::kFloat);
  const bool int4 = packed.size(2) == 16 * kTile, halves = group == 16;
  const auto run = [&](auto bits, auto* scales_type, auto halves_type) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(scales_type)>>;
    all_tiles<decltype(bits)::value, S, decltype(halves_type)::value>(
        rows, tiles, packed.data_ptr<uint8_t>(), static_cast<const S*>(scales_mins.data_ptr()), xq.data_ptr<int8_t>(),
        xs.data_ptr<float>(), in_features, group, out_features, y.data_ptr<float>());
  };
  const auto by_format = [&](auto* scales_type) {
    using Four = std::integral_constant<int, 4>;
    using Eight = std::integral_constant<int, 8>;
    if (int4 && halves) run(Four(), scales_type, std::true_type());
    else if (int4) run(Four(), scales_type, std::false_type());
    else if (halves) run(Eight(), scales_type, std::true_type());
    else run(Eight(), scales_type, std::false_type());
  };
  if (scales_mins.scalar_type() == at::kHalf)
    by_format(static_cast<const c10::Half*>(nullptr));
  else
    by_format(static_cast<const float*>(nullptr));
  return y;
}

}  // namespace leanserve
