// The SIMD layer of the native CPU kernels: one small set of vector operations, implemented for
// AVX-512, for AVX2 + FMA + F16C, and in portable C++ (loops over a fixed-width array, which the
// compiler may vectorize for any target, aarch64 included). The kernels are written once over it,
// as llama.cpp's CPU backend writes its ops over simd-mappings.h; the compiler flags of the build
// pick the implementation (cpu_kernels.py builds one module per level).
//
//   Vec    kLanes floats           load/store from float, float16 and bfloat16 (stores round to
//                                  nearest even, as torch's casts do), fmadd, max, reductions, exp, tanh,
//                                  transpose (kLanes vectors)
//   Ints   kLanes int32 lanes      integer dot products (dot_int4, dot_int8)
//   Bytes  4 kLanes bytes          4 bytes per int32 lane: the weights the dots multiply
//
// dot_int4<N, V>(q, x, out) gives each int32 lane (an output row) of out[n] the dot product of its
// 4 V weights, 4 in each of the V byte vectors q (unsigned, 0..15; V = 8: a block of 32, V = 4: half
// of one), with the 4 V signed activation bytes at x[n], for N activation vectors at once (N
// independent chains hide the instructions' latency); dot_int8 does the same for int8 weights
// (stored as w + kInt8Offset where w may be negative: linear.h). Each
// level supplies the integer primitives: vpdpbusd (unsigned times signed bytes, 4 a lane, into
// int32) where it has VNNI, and in portable C++; otherwise pmaddubsw and pmaddwd, where the int8
// weights stay signed and are multiplied as |w| times x with w's signs, which cannot saturate.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#if defined(LEANSERVE_PORTABLE)
// the portable build: no intrinsics, whatever the compiler targets
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define LEANSERVE_SIMD_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LEANSERVE_SIMD_AVX2 1
#include <immintrin.h>
#endif

namespace simd {

#if defined(LEANSERVE_SIMD_AVX512)
// ------------------------------------------------------------------------------------------ AVX-512

#if defined(__AVX512VNNI__)
constexpr const char* kLevel = "avx512_vnni";
constexpr int kInt8Offset = 128;
#else
constexpr const char* kLevel = "avx512";
constexpr int kInt8Offset = 0;
#endif
constexpr int kLanes = 16, kRegisters = 32;
using Vec = __m512;
using Ints = __m512i;
using Bytes = __m512i;

inline __mmask16 first_lanes(int n) { return static_cast<__mmask16>((1u << n) - 1); }
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec set1(float x) { return _mm512_set1_ps(x); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline Vec load(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline Vec load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
inline void store(float* p, Vec x) { _mm512_storeu_ps(p, x); }
inline void store(c10::Half* p, Vec x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store(c10::BFloat16* p, Vec x) {      // c10's rounding: + 0x7FFF + the lowest kept bit
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
inline void store_partial(float* p, Vec x, int n) { _mm512_mask_storeu_ps(p, first_lanes(n), x); }
// Lanes already rounded to integers in -127..127, stored as kLanes int8.
inline void store_int8(int8_t* p, Vec x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(x)));
}
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline Vec abs(Vec a) { return _mm512_abs_ps(a); }
inline Vec round(Vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// a >= b ? x : y, lane by lane.
inline Vec select_ge(Vec a, Vec b, Vec x, Vec y) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GE_OQ), y, x); }
// x 2^n for integral n in -126..127.
inline Vec ldexp(Vec x, Vec n) {
  return _mm512_mul_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n),
                                                                                  _mm512_set1_epi32(127)), 23)));
}
inline float reduce_add(Vec a) { return _mm512_reduce_add_ps(a); }
inline float reduce_max(Vec a) { return _mm512_reduce_max_ps(a); }
// Lane t of the result is the sum of v[t]'s lanes: 16 horizontal sums in 45 instructions
// (pairwise interleaved adds: within 128-bit lanes, then across them).
inline Vec sum_lanes(const Vec* v) {
  Vec a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const Vec c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xEE));
  const Vec c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
}

// v[i] lane j becomes v[j] lane i (a 16 x 16 transpose): interleave pairs, then pairs of pairs, then
// 128-bit quarters.
inline void transpose(Vec* v) {
  Vec t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  auto pd = [](Vec x) { return _mm512_castps_pd(x); };
  Vec u[16];                // u[4 i + k], quarter l: column 4 l + k of rows 4 i .. 4 i + 3
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
  }
  for (int k = 0; k < 4; ++k) {
    const Vec x0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88), x1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD);
    const Vec y0 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88), y1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);
    v[k] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    v[k + 4] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    v[k + 8] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    v[k + 12] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
}

inline Bytes load_bytes(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline Bytes low_nibbles(Bytes b) { return _mm512_and_si512(b, _mm512_set1_epi8(0x0F)); }
inline Bytes high_nibbles(Bytes b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(0x0F)); }
inline Vec to_float(Ints a) { return _mm512_cvtepi32_ps(a); }
inline Ints broadcast4(const int8_t* x) {
  int32_t x4;
  std::memcpy(&x4, x, 4);
  return _mm512_set1_epi32(x4);
}
inline Ints add32(Ints a, Ints b) { return _mm512_add_epi32(a, b); }
#if defined(__AVX512VNNI__)
constexpr bool kVnni = true;
inline Ints dpbusd(Ints acc, Bytes u, Ints s) { return _mm512_dpbusd_epi32(acc, u, s); }
#else
constexpr bool kVnni = false;
inline Ints dpbusd(Ints acc, Bytes u, Ints s);     // VNNI builds only
#endif
inline Ints maddubs(Bytes u, Ints s) { return _mm512_maddubs_epi16(u, s); }
inline Ints add16(Ints a, Ints b) { return _mm512_add_epi16(a, b); }
inline Ints madd_ones(Ints a) { return _mm512_madd_epi16(a, _mm512_set1_epi16(1)); }
inline Bytes abs8(Bytes w) { return _mm512_abs_epi8(w); }
inline Ints sign8(Ints x, Bytes w) {    // x with w's signs (0 where w is 0 does not matter: |w| is 0); no vpsignb
  return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
}

#elif defined(LEANSERVE_SIMD_AVX2)
// ------------------------------------------------------------------------------------- AVX2 + FMA

#if defined(__AVXVNNI__)
constexpr const char* kLevel = "avx2_vnni";
constexpr int kInt8Offset = 128;
#else
constexpr const char* kLevel = "avx2";
constexpr int kInt8Offset = 0;
#endif
constexpr int kLanes = 8, kRegisters = 16;
using Vec = __m256;
using Ints = __m256i;
using Bytes = __m256i;

inline __m256i first_lanes(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec set1(float x) { return _mm256_set1_ps(x); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec load(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline Vec load_partial(const float* p, int n) { return _mm256_maskload_ps(p, first_lanes(n)); }
inline void store(float* p, Vec x) { _mm256_storeu_ps(p, x); }
inline void store(c10::Half* p, Vec x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store(c10::BFloat16* p, Vec x) {      // c10's rounding: + 0x7FFF + the lowest kept bit
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void store_partial(float* p, Vec x, int n) { _mm256_maskstore_ps(p, first_lanes(n), x); }
inline void store_int8(int8_t* p, Vec x) {
  const __m256i i32 = _mm256_cvtps_epi32(x);
  const __m256i i8 = _mm256_packs_epi16(_mm256_packs_epi32(i32, i32), _mm256_setzero_si256());
  const int32_t low = _mm256_extract_epi32(i8, 0), high = _mm256_extract_epi32(i8, 4);
  std::memcpy(p, &low, 4);
  std::memcpy(p + 4, &high, 4);
}
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline Vec abs(Vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline Vec round(Vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec select_ge(Vec a, Vec b, Vec x, Vec y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GE_OQ)); }
inline Vec ldexp(Vec x, Vec n) {
  return _mm256_mul_ps(x, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                                  _mm256_set1_epi32(127)), 23)));
}
inline float reduce_add(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_max(Vec a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline Vec sum_lanes(const Vec* v) {     // 8 horizontal sums: pairwise hadds, then the two halves
  const Vec u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const Vec u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// v[i] lane j becomes v[j] lane i (an 8 x 8 transpose).
inline void transpose(Vec* v) {
  Vec t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {          // u[4 i + k], half l: column 4 l + k of rows 4 i .. 4 i + 3
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    v[k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);
    v[k + 4] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);
  }
}

inline Bytes load_bytes(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline Bytes low_nibbles(Bytes b) { return _mm256_and_si256(b, _mm256_set1_epi8(0x0F)); }
inline Bytes high_nibbles(Bytes b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(0x0F)); }
inline Vec to_float(Ints a) { return _mm256_cvtepi32_ps(a); }
inline Ints broadcast4(const int8_t* x) {
  int32_t x4;
  std::memcpy(&x4, x, 4);
  return _mm256_set1_epi32(x4);
}
inline Ints add32(Ints a, Ints b) { return _mm256_add_epi32(a, b); }
#if defined(__AVXVNNI__)
constexpr bool kVnni = true;
inline Ints dpbusd(Ints acc, Bytes u, Ints s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#else
constexpr bool kVnni = false;
inline Ints dpbusd(Ints acc, Bytes u, Ints s);     // VNNI builds only
#endif
inline Ints maddubs(Bytes u, Ints s) { return _mm256_maddubs_epi16(u, s); }
inline Ints add16(Ints a, Ints b) { return _mm256_add_epi16(a, b); }
inline Ints madd_ones(Ints a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
inline Bytes abs8(Bytes w) { return _mm256_abs_epi8(w); }
inline Ints sign8(Ints x, Bytes w) { return _mm256_sign_epi8(x, w); }

#else
// --------------------------------------------------------------------------------------- portable

constexpr const char* kLevel = "portable";
constexpr int kInt8Offset = 128;
constexpr int kLanes = 8, kRegisters = 16;
struct Vec { float v[kLanes]; };
struct Ints { int32_t v[kLanes]; };
struct Bytes { uint8_t v[4 * kLanes]; };

template <typename F>
inline Vec each(F f) {
  Vec r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = f(i);
  return r;
}
inline Vec zero() { return each([](int) { return 0.f; }); }
inline Vec set1(float x) { return each([=](int) { return x; }); }
template <typename T>
inline Vec load(const T* p) { return each([=](int i) { return static_cast<float>(p[i]); }); }
inline Vec load_partial(const float* p, int n) { return each([=](int i) { return i < n ? p[i] : 0.f; }); }
template <typename T>
inline void store(T* p, Vec x) { for (int i = 0; i < kLanes; ++i) p[i] = static_cast<T>(x.v[i]); }
inline void store_partial(float* p, Vec x, int n) { for (int i = 0; i < n; ++i) p[i] = x.v[i]; }
inline void store_int8(int8_t* p, Vec x) { for (int i = 0; i < kLanes; ++i) p[i] = static_cast<int8_t>(x.v[i]); }
inline Vec add(Vec a, Vec b) { return each([&](int i) { return a.v[i] + b.v[i]; }); }
inline Vec sub(Vec a, Vec b) { return each([&](int i) { return a.v[i] - b.v[i]; }); }
inline Vec mul(Vec a, Vec b) { return each([&](int i) { return a.v[i] * b.v[i]; }); }
inline Vec div(Vec a, Vec b) { return each([&](int i) { return a.v[i] / b.v[i]; }); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return each([&](int i) { return a.v[i] * b.v[i] + c.v[i]; }); }
inline Vec max(Vec a, Vec b) { return each([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; }); }
inline Vec min(Vec a, Vec b) { return each([&](int i) { return a.v[i] < b.v[i] ? a.v[i] : b.v[i]; }); }
inline Vec abs(Vec a) { return each([&](int i) { return a.v[i] < 0.f ? -a.v[i] : a.v[i]; }); }
inline Vec round(Vec a) { return each([&](int i) { return __builtin_nearbyintf(a.v[i]); }); }
inline Vec select_ge(Vec a, Vec b, Vec x, Vec y) { return each([&](int i) { return a.v[i] >= b.v[i] ? x.v[i] : y.v[i]; }); }
inline Vec ldexp(Vec x, Vec n) {
  return each([&](int i) {
    const int32_t bits = (static_cast<int32_t>(n.v[i]) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return x.v[i] * scale;
  });
}
inline float reduce_add(Vec a) {     // pairwise, as the vector versions add
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) a.v[i] += a.v[i + width];
  return a.v[0];
}
inline float reduce_max(Vec a) {
  float m = a.v[0];
  for (int i = 1; i < kLanes; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}
inline Vec sum_lanes(const Vec* v) { return each([&](int i) { return reduce_add(v[i]); }); }
inline void transpose(Vec* v) {
  for (int i = 0; i < kLanes; ++i)
    for (int j = i + 1; j < kLanes; ++j) std::swap(v[i].v[j], v[j].v[i]);
}

inline Bytes load_bytes(const uint8_t* p) {
  Bytes b;
  std::memcpy(b.v, p, sizeof(b.v));
  return b;
}
inline Bytes low_nibbles(Bytes b) {
  for (auto& x : b.v) x &= 0x0F;
  return b;
}
inline Bytes high_nibbles(Bytes b) {
  for (auto& x : b.v) x >>= 4;
  return b;
}
inline Vec to_float(Ints a) { return each([&](int i) { return static_cast<float>(a.v[i]); }); }
struct Bytes4 { int32_t v[4]; };             // a 4-byte group of x, as every lane meets it
inline Bytes4 broadcast4(const int8_t* x) { return {{x[0], x[1], x[2], x[3]}}; }
constexpr bool kVnni = true;                  // vpdpbusd's arithmetic, in plain C++
inline Ints dpbusd(Ints acc, const Bytes& u, const Bytes4& s) {
  for (int i = 0; i < kLanes; ++i)
    acc.v[i] += u.v[4 * i] * s.v[0] + u.v[4 * i + 1] * s.v[1] + u.v[4 * i + 2] * s.v[2] + u.v[4 * i + 3] * s.v[3];
  return acc;
}
// The pmaddubsw route is for vector levels without VNNI only.
Ints add32(Ints, Ints);
Ints maddubs(Bytes, Bytes4);
Ints add16(Ints, Ints);
Ints madd_ones(Ints);
Bytes abs8(Bytes);
Bytes4 sign8(Bytes4, Bytes);
#endif

// ---------------------------------------------------------------------------------- on every level

// The block dot products (see the top): vpdpbusd chains where the level has it; otherwise pmaddubsw,
// int4 products summed in 16 bits before widening, int8 as |w| times x with w's signs.
template <int N, int V = 8>
inline void dot_int4(const Bytes* q, const int8_t* const* x, Ints* out) {
  static_assert(V >= 1 && V <= 8, "a block has 8 byte vectors");
  if constexpr (kVnni) {
    for (int n = 0; n < N; ++n) out[n] = Ints{};
    for (int v = 0; v < V; ++v)
      for (int n = 0; n < N; ++n) out[n] = dpbusd(out[n], q[v], broadcast4(x[n] + 4 * v));
  } else {                                    // |sums| <= 8 * 2 * 15 * 127 < 2^15
    Ints sums[N];
    for (int n = 0; n < N; ++n) sums[n] = maddubs(q[0], broadcast4(x[n]));
    for (int v = 1; v < V; ++v)
      for (int n = 0; n < N; ++n) sums[n] = add16(sums[n], maddubs(q[v], broadcast4(x[n] + 4 * v)));
    for (int n = 0; n < N; ++n) out[n] = madd_ones(sums[n]);
  }
}
template <int N, int V = 8>
inline void dot_int8(const Bytes* q, const int8_t* const* x, Ints* out) {
  if constexpr (kVnni) {
    dot_int4<N, V>(q, x, out);                // the same vpdpbusd on unsigned weight bytes
  } else {
    for (int n = 0; n < N; ++n) out[n] = Ints{};
    for (int v = 0; v < V; ++v) {
      const Bytes w = abs8(q[v]);
      for (int n = 0; n < N; ++n) out[n] = add32(out[n], madd_ones(maddubs(w, sign8(broadcast4(x[n] + 4 * v), q[v]))));
    }
  }
}

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// exp(x): 2^(x log2 e) = 2^n 2^f, n = round(x log2 e), 2^f (|f| <= 1/2) by its degree-6 Taylor
// polynomial in f ln 2 (relative error ~1e-7). x is clamped to [-87, 88], where 2^n stays a
// normal float: exp(-87) ~ 1.6e-38 stands for anything smaller, exp(88) ~ 1.7e38 for larger.
inline Vec exp(Vec x) {
  const Vec t = mul(min(max(x, set1(-87.f)), set1(88.f)), set1(1.44269504088896341f));
  const Vec n = round(t);
  const Vec r = mul(sub(t, n), set1(0.693147180559945309f));
  Vec p = set1(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = fmadd(p, r, set1(c));
  return ldexp(p, n);
}

// tanh(x) = 1 - 2 / (exp(2x) + 1), which cancels near 0 (losing relative accuracy), so |x| < 1/4 takes
// the odd Taylor polynomial to x^9 instead (relative error < 1e-8 there).
inline Vec tanh(Vec x) {
  const Vec x2 = mul(x, x);
  Vec p = set1(62.f / 2835);
  for (const float c : {-17.f / 315, 2.f / 15, -1.f / 3, 1.f}) p = fmadd(p, x2, set1(c));
  const Vec large = sub(set1(1.f), div(set1(2.f), add(exp(add(x, x)), set1(1.f))));
  return select_ge(abs(x), set1(0.25f), large, mul(p, x));
}

}  // namespace simd
