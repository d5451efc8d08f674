// Fused CPU kernel: every adapted row of one or more modules that read the same input (q, k, v;
// gate, up) in one call, straight from the pool's compact weights (see cpu_backend.py).
//
// Semantics, for every module (y, table, scales) of the call and every row t with
// s = row_slots[t], 0 <= s < S and table[s, PRESENT] != 0, weights and dims
// (R, u, m, n, cA, cB, sA, sB) read from table[s], alpha / r = scales[s]:
//   z[k]   = sum_i sum_j x[t, i*cA + j] * A0[(k + i*sA) % R, j]       (k < R, i*cA + j < h)
//   su[q]  = sum_c Au[q, c] * x[t, c]                                  (q < u)
//   y[t, i*cB + j] += scales[s] * ( sum_c B0t[c, j] * z[(c - i*sB) % R]
//                                   + sum_q But[q, i*cB + j] * su[q] ) (i*cB + j < o)
// Other rows (NO_ADAPTER, or an adapter that does not target this module) are left alone.
// A float32 y accumulates in place; a 16-bit y gets its row's delta summed in float32 first and
// then added once, y = round(y + delta), as torch's y.add_(float32 delta) rounds it.
// shapes: x (T, h) and each module's y (T, o) float32, bfloat16 or float16 (each its own type,
//         16-bit x widened to float32 per row), table (S, kNumFields) int64 (weight
//         addresses and dims, see Field), scales (S) float32; row_slots (T) int64; A0 (R, cA),
//         B0t (R, cB), Au (u, h), But (u, o) are contiguous, of the element type `weight_type`
//         (float32, bfloat16 or float16), converted to float32 in registers.
//
// Why this shape: mixed-adapter decode reads each row's own small weights once, so the cost is
// instructions and memory latency, not FLOPs. The shrink keeps kBlock rank accumulators of
// kLanes floats live in registers across all m chunks (one horizontal sum per rank, not per
// chunk and rank); the expand reads and writes each output run once per kBlock rows of B0t and
// But together. Reading the pool's tensors by address means no per-step copies of weights.
#include "cpu_kernels.h"
#include "cpu_lanes.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace prolora {
namespace {

constexpr int64_t kBlock = 8;   // ranks handled per pass, their accumulators live in registers
constexpr int64_t kRowsPerThread = 16;

template <typename W>
struct Layer {
  const W *a0, *b0t, *au, *but;
  int64_t R, u, m, n, cA, cB, sA, sB;
  float scale;
};

template <typename W>
Layer<W> layer_of(const int64_t* e, float scale) {
  auto ptr = [](int64_t address) { return reinterpret_cast<const W*>(address); };
  return {ptr(e[kA0]), ptr(e[kB0t]), ptr(e[kAu]), ptr(e[kBut]), e[kR], e[kU], e[kM], e[kN],
          e[kCA], e[kCB], e[kSA], e[kSB], scale};
}

// Rows are addressed by rotated index: row k of chunk i is base[((k + i*step) mod count) * stride].
// The shift advances by addition (step <= count), never by integer division in the hot loop.
inline int64_t wrap(int64_t value, int64_t modulus) { return value < modulus ? value : value - modulus; }

template <typename W>
struct RotatedRows {
  const W* base;
  int64_t stride, count, step;  // step: rotation added per chunk, 0 <= step <= count
};

// out[k] = sum_i dot(x[i*chunk : i*chunk + len_i], row k of chunk i) for kb <= k < kb + K,
// kept in accumulator registers across all chunks (two per k, alternating lane blocks, so
// short K still has independent FMA chains), one horizontal sum per k at the end.
template <typename W, int K>
inline void dot_block(const float* x, int64_t num_chunks, int64_t chunk, int64_t limit, int64_t kb,
                      const RotatedRows<W>& src, float* out) {
  Lanes even[K], odd[K];
  for (int k = 0; k < K; ++k) even[k] = odd[k] = zero_lanes();
  int64_t shift = 0;
  for (int64_t i = 0; i < num_chunks && i * chunk < limit; ++i) {
    const int64_t start = i * chunk, len = std::min(chunk, limit - start);
    const W* rows[K];
    for (int k = 0; k < K; ++k) rows[k] = src.base + wrap(kb + k + shift, src.count) * src.stride;
    shift = wrap(shift + src.step, src.count);
    const float* xs = x + start;
    int64_t j = 0;
    for (; j + 2 * kLanes <= len; j += 2 * kLanes) {
      const Lanes x0 = load_lanes(xs + j, kLanes), x1 = load_lanes(xs + j + kLanes, kLanes);
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) {
        even[k] = fma_lanes(x0, load_lanes(rows[k] + j, kLanes), even[k]);
        odd[k] = fma_lanes(x1, load_lanes(rows[k] + j + kLanes, kLanes), odd[k]);
      }
    }
    for (; j < len; j += kLanes) {
      const Lanes xv = load_lanes(xs + j, len - j);
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) even[k] = fma_lanes(xv, load_lanes(rows[k] + j, len - j), even[k]);
    }
  }
  for (int k = 0; k < K; ++k) out[kb + k] = sum_lanes(even[k]) + sum_lanes(odd[k]);
}

template <typename W>
void multi_dot(const float* x, int64_t num_chunks, int64_t chunk, int64_t limit,
               const RotatedRows<W>& src, float* out) {
  for (int64_t kb = 0; kb < src.count; kb += kBlock) {
    dispatch_up_to_8(std::min(kBlock, src.count - kb), [&](auto K) {
      dot_block<W, K()>(x, num_chunks, chunk, limit, kb, src, out);
    });
  }
}

// out[j] += sum_k coef[k] * rows[k][j] for j < len, k < K: each output run read and written
// once. Four lane blocks at a time give four independent FMA chains over k.
template <typename W, int K>
inline void axpy_block(float* out, int64_t len, const W* const* rows, const float* coef) {
  constexpr int64_t kWide = 4 * kLanes;
  int64_t j = 0;
  for (; j + kWide <= len; j += kWide) {
    Lanes v[4];
    for (int b = 0; b < 4; ++b) v[b] = load_lanes(out + j + b * kLanes, kLanes);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k)
      for (int b = 0; b < 4; ++b)
        v[b] = fma_lanes(coef[k], load_lanes(rows[k] + j + b * kLanes, kLanes), v[b]);
    for (int b = 0; b < 4; ++b) store_lanes(out + j + b * kLanes, v[b], kLanes);
  }
  for (; j < len; j += kLanes) {
    const int64_t valid = len - j;
    Lanes v = load_lanes(out + j, valid), w = zero_lanes();
#pragma GCC unroll 8
    for (int k = 0; k + 1 < K; k += 2) {
      v = fma_lanes(coef[k], load_lanes(rows[k] + j, valid), v);
      w = fma_lanes(coef[k + 1], load_lanes(rows[k + 1] + j, valid), w);
    }
    if (K % 2) v = fma_lanes(coef[K - 1], load_lanes(rows[K - 1] + j, valid), v);
    store_lanes(out + j, add_lanes(v, w), valid);
  }
}

// out[j] += sum_k coef[k] * rows[k][j] for j < len, k < count (blocks of kBlock rows).
template <typename W>
void axpy_rows(float* out, int64_t len, int64_t count, const W* const* rows, const float* coef) {
  for (int64_t kb = 0; kb < count; kb += kBlock) {
    dispatch_up_to_8(std::min(kBlock, count - kb), [&](auto K) {
      axpy_block<W, K()>(out, len, rows + kb, coef + kb);
    });
  }
}

// Per-thread buffers of one row's delta: z (R), the expand's coefficients (R shared, then u
// unshared) and its rows (B0^T's R rows, then the u rows of Bu^T at the chunk's offset).
template <typename W>
struct RowScratch {
  std::vector<float> z, coef;
  std::vector<const W*> rows;
  std::vector<float> x_row, delta;  // a widened 16-bit x row; a 16-bit output's float32 delta
};

// Adds one row's delta into out (length o). The expand of each output chunk takes B0^T's rows
// and Bu^T's together, so every output element is read and written once: a second pass for
// Bu^T would load runs that straddle the chunks' just-stored, unaligned ends, which the store
// buffer cannot forward (docs/BENCHMARKS.md, "the kernel's read order").
template <typename W>
void row_delta(const float* x, int64_t h, float* out, int64_t o, const Layer<W>& L, RowScratch<W>& s) {
  s.z.resize(L.R);
  s.coef.resize(L.R + L.u);
  s.rows.resize(L.R + L.u);
  float* su = s.coef.data() + L.R;
  multi_dot<W>(x, L.m, L.cA, h, {L.a0, L.cA, L.R, L.R > 0 ? L.sA % L.R : 0}, s.z.data());
  multi_dot<W>(x, 1, h, h, {L.au, h, L.u, 0}, su);
  for (int64_t q = 0; q < L.u; ++q) su[q] *= L.scale;
  for (int64_t k = 0; k < L.R; ++k) s.rows[k] = L.b0t + k * L.cB;
  // without shared ranks (u = r) the output is one chunk of Bu^T alone
  const int64_t chunk = L.R > 0 ? L.cB : o, chunks = L.R > 0 ? L.n : 1;
  int64_t shift = 0;  // (i * sB) mod R
  for (int64_t i = 0; i < chunks && i * chunk < o; ++i) {
    for (int64_t c = 0; c < L.R; ++c) s.coef[c] = L.scale * s.z[c >= shift ? c - shift : c - shift + L.R];
    if (L.R > 0) shift = wrap(shift + L.sB % L.R, L.R);
    for (int64_t q = 0; q < L.u; ++q) s.rows[L.R + q] = L.but + q * o + i * chunk;
    axpy_rows<W>(out + i * chunk, std::min(chunk, o - i * chunk), L.R + L.u, s.rows.data(), s.coef.data());
  }
}

// 16-bit activations: x rows widened to float32, deltas added into y with one rounding.
template <typename T>
void widen(const T* from, int64_t count, float* to) {
  for (int64_t i = 0; i < count; ++i) to[i] = static_cast<float>(from[i]);
}

template <typename T>
void add_rounded(T* to, const float* delta, int64_t count) {
  for (int64_t i = 0; i < count; ++i) to[i] = static_cast<T>(static_cast<float>(to[i]) + delta[i]);
}

// Row t of x as float32: x itself when it is float32, else widened into `buffer`.
inline const float* float_row(const void* x, ElementType type, int64_t t, int64_t h,
                              std::vector<float>& buffer) {
  if (type == kFloat32) return static_cast<const float*>(x) + t * h;
  buffer.resize(h);
  if (type == kBFloat16) widen(static_cast<const c10::BFloat16*>(x) + t * h, h, buffer.data());
  else widen(static_cast<const Half16*>(x) + t * h, h, buffer.data());
  return buffer.data();
}

template <typename W>
void add_row_delta(const float* x, int64_t h, const ModuleTable& module, int64_t t,
                   const Layer<W>& layer, RowScratch<W>& scratch) {
  const int64_t o = module.out_features;
  if (module.y_type == kFloat32) {
    row_delta(x, h, static_cast<float*>(module.y) + t * o, o, layer, scratch);
    return;
  }
  std::vector<float>& delta = scratch.delta;
  delta.assign(o, 0.0f);
  row_delta(x, h, delta.data(), o, layer, scratch);
  if (module.y_type == kBFloat16) add_rounded(static_cast<c10::BFloat16*>(module.y) + t * o, delta.data(), o);
  else add_rounded(static_cast<Half16*>(module.y) + t * o, delta.data(), o);
}

template <typename W>
void apply_rows(const ModuleTable* modules, int64_t num_modules, const void* x, ElementType x_type,
                int64_t num_rows, int64_t h, const int64_t* row_slots) {
  // The table entry of row t for a module, or nullptr where the row has no adapter for it.
  auto entry_of = [&](const ModuleTable& module, int64_t slot) -> const int64_t* {
    if (slot < 0 || slot >= module.num_slots) return nullptr;
    const int64_t* entry = module.table + slot * kNumFields;
    return entry[kPresent] != 0 ? entry : nullptr;
  };
  // A row costs about a microsecond per module; torch's pool threads are still spinning from the
  // previous op, so handing 16-row chunks to them pays already at decode batches (32 rows:
  // 1.2-1.7x faster than one thread, kernels.bench with 2 threads). The modules of a row run
  // back to back, while its x is in L1.
  at::parallel_for(0, num_rows, kRowsPerThread, [&](int64_t begin, int64_t end) {
    RowScratch<W> scratch;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = row_slots[t];
      const float* xt = nullptr;  // widened on the row's first adapted module
      for (int64_t j = 0; j < num_modules; ++j) {
        const ModuleTable& module = modules[j];
        const int64_t* entry = entry_of(module, slot);
        if (entry == nullptr) continue;
        if (xt == nullptr) xt = float_row(x, x_type, t, h, scratch.x_row);
        add_row_delta(xt, h, module, t, layer_of<W>(entry, module.scales[slot]), scratch);
      }
    }
  });
}

}  // namespace

void gathered_apply(const ModuleTable* modules, int64_t num_modules, const void* x,
                    ElementType x_type, int64_t num_rows, int64_t in_features,
                    const int64_t* row_slots, ElementType weight_type) {
  const auto args = std::make_tuple(modules, num_modules, x, x_type, num_rows, in_features, row_slots);
  switch (weight_type) {
    case kFloat32: std::apply(apply_rows<float>, args); break;
    case kBFloat16: std::apply(apply_rows<c10::BFloat16>, args); break;
    case kFloat16: std::apply(apply_rows<Half16>, args); break;
  }
}

}  // namespace prolora
