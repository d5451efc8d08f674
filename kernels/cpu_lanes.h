// Lanes: kLanes floats, loaded and stored with a count of valid lanes so tails need no scalar
// loop. One AVX-512 register where the build has AVX-512, else a portable array (the build with
// -DPROLORA_PORTABLE_LANES, which tests also check on AVX-512 machines). Weights and caches may
// be float32, bfloat16 or float16; loads widen them to float32 in registers.
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
