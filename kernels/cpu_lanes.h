// Lanes: kLanes floats, loaded and stored with a count of valid lanes so tails need no scalar
// loop. One AVX-512 register where the build has AVX-512, else two AVX2 registers where it has
// AVX2 + FMA + F16C (AMD EPYC before Zen 4, older Intel), else a portable array. Builds choose
// with flags (cpu_extension.py: -mno-avx512f for the AVX2 lanes on an AVX-512 machine,
// -DPROLORA_PORTABLE_LANES for the array), so tests check every kind against the references on
// one machine. Weights and caches may be float32, bfloat16 or float16; loads widen them to
// float32 in registers.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <immintrin.h>

namespace prolora {

constexpr int64_t kLanes = 16;  // floats per AVX-512 register

#ifdef __FLT16_MAX__
using Half16 = _Float16;  // converts with F16C instructions where the CPU has them
#else
using Half16 = c10::Half;
#endif

// exp(x) for x <= 0 (softmax after subtracting the max): Cephes' expf polynomial on
// r = x - n ln2, scaled by 2^n; below -87 the result is clamped near FLT_MIN instead of 0.
constexpr float kExpFloor = -87.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#if defined(__AVX512F__) && !defined(PROLORA_PORTABLE_LANES)
struct Lanes {
  __m512 v;
};
inline __mmask16 mask_of(int64_t valid) { return static_cast<__mmask16>((1u << valid) - 1u); }
inline Lanes zero_lanes() { return {_mm512_setzero_ps()}; }
inline Lanes splat_lanes(float a) { return {_mm512_set1_ps(a)}; }
inline Lanes load_lanes(const float* p, int64_t valid) {
  return {valid >= kLanes ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask_of(valid), p)};
}
inline Lanes load_lanes(const c10::BFloat16* p, int64_t valid) {
  const __m256i raw = valid >= kLanes ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                      : _mm256_maskz_loadu_epi16(mask_of(valid), p);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))};
}
inline Lanes load_lanes(const Half16* p, int64_t valid) {
  const __m256i raw = valid >= kLanes ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                      : _mm256_maskz_loadu_epi16(mask_of(valid), p);
  return {_mm512_cvtph_ps(raw)};
}
// Like load_lanes, with `fill` in the lanes past `valid`.
inline Lanes load_lanes_or(const float* p, int64_t valid, float fill) {
  return {valid >= kLanes ? _mm512_loadu_ps(p)
                          : _mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask_of(valid), p)};
}
inline void store_lanes(float* p, Lanes a, int64_t valid) {
  if (valid >= kLanes) _mm512_storeu_ps(p, a.v);
  else _mm512_mask_storeu_ps(p, mask_of(valid), a.v);
}
inline Lanes fma_lanes(Lanes a, Lanes b, Lanes acc) { return {_mm512_fmadd_ps(a.v, b.v, acc.v)}; }
inline Lanes fma_lanes(float a, Lanes b, Lanes acc) {
  return {_mm512_fmadd_ps(_mm512_set1_ps(a), b.v, acc.v)};
}
inline Lanes add_lanes(Lanes a, Lanes b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Lanes max_lanes(Lanes a, Lanes b) { return {_mm512_max_ps(a.v, b.v)}; }
inline float sum_lanes(Lanes a) { return _mm512_reduce_add_ps(a.v); }
inline float max_of_lanes(Lanes a) { return _mm512_reduce_max_ps(a.v); }
inline Lanes exp_lanes(Lanes x) {
  const __m512 clamped = _mm512_max_ps(x.v, _mm512_set1_ps(kExpFloor));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return {_mm512_scalef_ps(y, n)};
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(PROLORA_PORTABLE_LANES)
struct Lanes {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
constexpr int64_t kHalfLanes = 8;
// All-ones in the first `valid` (clamped to 0..8) of eight 32-bit lanes.
inline __m256i first_lanes(int64_t valid) {
  const int count = static_cast<int>(std::clamp<int64_t>(valid, 0, kHalfLanes));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Lanes zero_lanes() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Lanes splat_lanes(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline Lanes load_lanes(const float* p, int64_t valid) {
  if (valid >= kLanes) return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + kHalfLanes)};
  return {_mm256_maskload_ps(p, first_lanes(valid)),
          _mm256_maskload_ps(p + kHalfLanes, first_lanes(valid - kHalfLanes))};
}
// 16-bit values: AVX2 has no masked 16-bit load, so a tail is copied into zeros first.
inline __m256i load_16bit(const void* p, int64_t valid) {
  if (valid >= kLanes) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  alignas(32) uint16_t tail[kLanes] = {};
  std::copy_n(static_cast<const uint16_t*>(p), std::max<int64_t>(valid, 0), tail);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
}
inline Lanes load_lanes(const c10::BFloat16* p, int64_t valid) {
  const __m256i raw = load_16bit(p, valid);
  const auto widen = [](__m128i half) {  // bfloat16 is the top half of a float32
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  };
  return {widen(_mm256_castsi256_si128(raw)), widen(_mm256_extracti128_si256(raw, 1))};
}
inline Lanes load_lanes(const Half16* p, int64_t valid) {
  const __m256i raw = load_16bit(p, valid);
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(raw)),
          _mm256_cvtph_ps(_mm256_extracti128_si256(raw, 1))};
}
inline Lanes load_lanes_or(const float* p, int64_t valid, float fill) {
  if (valid >= kLanes) return load_lanes(p, valid);
  const __m256i lo = first_lanes(valid), hi = first_lanes(valid - kHalfLanes);
  const __m256 fills = _mm256_set1_ps(fill);
  return {_mm256_blendv_ps(fills, _mm256_maskload_ps(p, lo), _mm256_castsi256_ps(lo)),
          _mm256_blendv_ps(fills, _mm256_maskload_ps(p + kHalfLanes, hi), _mm256_castsi256_ps(hi))};
}
inline void store_lanes(float* p, Lanes a, int64_t valid) {
  if (valid >= kLanes) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + kHalfLanes, a.hi);
    return;
  }
  _mm256_maskstore_ps(p, first_lanes(valid), a.lo);
  _mm256_maskstore_ps(p + kHalfLanes, first_lanes(valid - kHalfLanes), a.hi);
}
inline Lanes fma_lanes(Lanes a, Lanes b, Lanes acc) {
  return {_mm256_fmadd_ps(a.lo, b.lo, acc.lo), _mm256_fmadd_ps(a.hi, b.hi, acc.hi)};
}
inline Lanes fma_lanes(float a, Lanes b, Lanes acc) {
  const __m256 splat = _mm256_set1_ps(a);
  return {_mm256_fmadd_ps(splat, b.lo, acc.lo), _mm256_fmadd_ps(splat, b.hi, acc.hi)};
}
inline Lanes add_lanes(Lanes a, Lanes b) {
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
inline Lanes max_lanes(Lanes a, Lanes b) {
  return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)};
}
inline float sum_lanes(Lanes a) {
  const __m256 eight = _mm256_add_ps(a.lo, a.hi);
  __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  four = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(four, _mm_movehdup_ps(four)));
}
inline float max_of_lanes(Lanes a) {
  const __m256 eight = _mm256_max_ps(a.lo, a.hi);
  __m128 four = _mm_max_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  four = _mm_max_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_max_ss(four, _mm_movehdup_ps(four)));
}
inline __m256 exp_eight(__m256 x) {
  const __m256 clamped = _mm256_max_ps(x, _mm256_set1_ps(kExpFloor));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), clamped);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  // 2^n built in the exponent bits (no scalef in AVX2): n in [-126, 127] stays a normal float
  const __m256i exponent = _mm256_cvtps_epi32(_mm256_min_ps(n, _mm256_set1_ps(127.f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(exponent, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}
inline Lanes exp_lanes(Lanes x) { return {exp_eight(x.lo), exp_eight(x.hi)}; }
#else
struct Lanes {
  float v[kLanes];
};
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(Half16 v) { return static_cast<float>(v); }
inline Lanes zero_lanes() { return Lanes{}; }
inline Lanes splat_lanes(float a) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) out.v[l] = a;
  return out;
}
template <typename W>
inline Lanes load_lanes(const W* p, int64_t valid) {
  Lanes out{};
  for (int64_t l = 0; l < std::min(valid, kLanes); ++l) out.v[l] = to_float(p[l]);
  return out;
}
inline Lanes load_lanes_or(const float* p, int64_t valid, float fill) {
  Lanes out = splat_lanes(fill);
  for (int64_t l = 0; l < std::min(valid, kLanes); ++l) out.v[l] = p[l];
  return out;
}
inline void store_lanes(float* p, Lanes a, int64_t valid) {
  for (int64_t l = 0; l < std::min(valid, kLanes); ++l) p[l] = a.v[l];
}
inline Lanes fma_lanes(Lanes a, Lanes b, Lanes acc) {
  for (int64_t l = 0; l < kLanes; ++l) acc.v[l] += a.v[l] * b.v[l];
  return acc;
}
inline Lanes fma_lanes(float a, Lanes b, Lanes acc) {
  for (int64_t l = 0; l < kLanes; ++l) acc.v[l] += a * b.v[l];
  return acc;
}
inline Lanes add_lanes(Lanes a, Lanes b) {
  for (int64_t l = 0; l < kLanes; ++l) a.v[l] += b.v[l];
  return a;
}
inline Lanes max_lanes(Lanes a, Lanes b) {
  for (int64_t l = 0; l < kLanes; ++l) a.v[l] = std::max(a.v[l], b.v[l]);
  return a;
}
inline float sum_lanes(Lanes a) {
  float sum = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) sum += a.v[l];
  return sum;
}
inline float max_of_lanes(Lanes a) { return *std::max_element(a.v, a.v + kLanes); }
inline Lanes exp_lanes(Lanes x) {
  for (int64_t l = 0; l < kLanes; ++l) x.v[l] = std::exp(std::max(x.v[l], kExpFloor));
  return x;
}
#endif

}  // namespace prolora
