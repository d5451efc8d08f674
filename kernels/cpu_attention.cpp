// Paged decode attention on the CPU: one query token per sequence, reading keys and values
// straight from the paged cache through each sequence's block table (no gathered copy).
//
// Semantics, for every sequence s < S and query head h < Hq, with G = Hq / Hkv, key/value head
// g = h / G (grouped-query attention, as Hugging Face's repeat_kv), L = context_lens[s] and
// slot(p) = block_tables[s, p / bs] * bs + p % bs:
//   score[p]     = scale * sum_d q[s, h, d] * key_cache[slot(p), g, d]        (p < L)
//   out[s, h, d] = sum_p softmax(score)[p] * value_cache[slot(p), g, d]
// shapes: q, out (S, Hq, D) of one element type; key_cache, value_cache (num_blocks, bs, Hkv, D)
//         of one element type, the same or 16-bit under float32 q (arithmetic in float32);
//         block_tables (S, W) int64 with W * bs >= L; context_lens (S) int64, each >= 1.
//
// Why this shape: decode attention reads every cached key and value once and does two FMAs per
// element, so it is bound by memory and instruction count. One task per (sequence, key/value
// head) keeps its G query heads in registers while each key row streams past once; the value
// pass walks one 16-float column chunk at a time with the G accumulators in registers.
#include "cpu_kernels.h"
#include "cpu_lanes.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace prolora {
namespace {

constexpr int64_t kMinWorkPerThread = 1 << 15;  // key/value elements; below, threads cost more

// One sequence's view of one key/value head of the cache.
template <typename T>
struct HeadRows {
  const T* base;          // cache + g * D: row p of block b is base + (b * bs + p) * row_stride
  const int64_t* blocks;  // the sequence's block table
  int64_t block_size, row_stride;

  const T* row(int64_t block_index, int64_t offset) const {
    return base + (blocks[block_index] * block_size + offset) * row_stride;
  }
};

// scores[h * L + p] = q[h] . key(p) for h < G (q already scaled), p < L.
template <typename T, int G>
void score_keys(const float* q, int64_t D, const HeadRows<T>& keys, int64_t L, float* scores) {
  for (int64_t first = 0, b = 0; first < L; first += keys.block_size, ++b) {
    for (int64_t p = first; p < std::min(L, first + keys.block_size); ++p) {
      const T* key = keys.row(b, p - first);
      Lanes acc[G];
      for (int h = 0; h < G; ++h) acc[h] = zero_lanes();
      for (int64_t d = 0; d < D; d += kLanes) {
        const Lanes k = load_lanes(key + d, D - d);
        for (int h = 0; h < G; ++h) acc[h] = fma_lanes(load_lanes(q + h * D + d, D - d), k, acc[h]);
      }
      for (int h = 0; h < G; ++h) scores[h * L + p] = sum_lanes(acc[h]);
    }
  }
}

// scores[0:L] <- exp(scores - max); returns their sum.
inline float softmax_numerators(float* scores, int64_t L) {
  Lanes top = splat_lanes(scores[0]);
  for (int64_t p = 0; p < L; p += kLanes) top = max_lanes(top, load_lanes_or(scores + p, L - p, scores[0]));
  const Lanes shift = splat_lanes(-max_of_lanes(top));
  Lanes total = zero_lanes();
  for (int64_t p = 0; p < L; p += kLanes) {
    const Lanes e = exp_lanes(add_lanes(load_lanes(scores + p, L - p), shift));
    store_lanes(scores + p, e, L - p);
    total = add_lanes(total, load_lanes(scores + p, L - p));  // masked reload: tail lanes are 0
  }
  return sum_lanes(total);
}

// out[h * D + d] = sum_p weights[h * L + p] * value(p)[d] / totals[h] for h < G, d < D.
template <typename T, int G>
void weigh_values(const float* weights, const float* totals, int64_t D, const HeadRows<T>& values,
                  int64_t L, float* out) {
  for (int64_t d = 0; d < D; d += kLanes) {
    Lanes acc[G];
    for (int h = 0; h < G; ++h) acc[h] = zero_lanes();
    for (int64_t first = 0, b = 0; first < L; first += values.block_size, ++b) {
      for (int64_t p = first; p < std::min(L, first + values.block_size); ++p) {
        const Lanes v = load_lanes(values.row(b, p - first) + d, D - d);
        for (int h = 0; h < G; ++h) acc[h] = fma_lanes(weights[h * L + p], v, acc[h]);
      }
    }
    for (int h = 0; h < G; ++h)
      store_lanes(out + h * D + d, fma_lanes(1.f / totals[h], acc[h], zero_lanes()), D - d);
  }
}

// Query heads h0 .. h0 + G of one sequence against its key/value head; scratch: G * (L + 2D) + G.
template <typename Q, typename T, int G>
void attend_group(const Q* q, Q* out, const HeadRows<T>& keys, const HeadRows<T>& values,
                  int64_t L, int64_t D, float scale, std::vector<float>& scratch) {
  scratch.resize(G * (L + 2 * D) + G);
  float* qf = scratch.data();
  float* scores = qf + G * D;
  float* result = scores + G * L;
  float* totals = result + G * D;
  for (int64_t i = 0; i < G * D; ++i) qf[i] = scale * static_cast<float>(q[i]);
  score_keys<T, G>(qf, D, keys, L, scores);
  for (int h = 0; h < G; ++h) totals[h] = softmax_numerators(scores + h * L, L);
  weigh_values<T, G>(scores, totals, D, values, L, result);
  for (int64_t i = 0; i < G * D; ++i) out[i] = static_cast<Q>(result[i]);
}

template <typename Q, typename T>
void decode_all(Q* out, const Q* q, const T* key_cache, const T* value_cache,
                const int64_t* block_tables, const int64_t* context_lens, const DecodeShape& s,
                float scale) {
  const int64_t group = s.q_heads / s.kv_heads, D = s.head_dim, row_stride = s.kv_heads * D;
  const int64_t longest = *std::max_element(context_lens, context_lens + s.num_seqs);
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / (2 * longest * D));
  at::parallel_for(0, s.num_seqs * s.kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / s.kv_heads, g = task % s.kv_heads;
      const int64_t* blocks = block_tables + seq * s.table_width;
      const HeadRows<T> keys{key_cache + g * D, blocks, s.block_size, row_stride};
      const HeadRows<T> values{value_cache + g * D, blocks, s.block_size, row_stride};
      for (int64_t h0 = 0; h0 < group; h0 += 8) {  // query heads of this kv head, 8 at a time
        const int64_t first = (seq * s.q_heads + g * group + h0) * D;
        dispatch_up_to_8(std::min<int64_t>(8, group - h0), [&](auto G) {
          attend_group<Q, T, G()>(q + first, out + first, keys, values, context_lens[seq], D, scale,
                               scratch);
        });
      }
    }
  });
}

}  // namespace

void paged_decode_attention(void* out, const void* q, ElementType q_type, const void* key_cache,
                            const void* value_cache, ElementType cache_type,
                            const int64_t* block_tables, const int64_t* context_lens,
                            const DecodeShape& shape, float scale) {
  // q_type is cache_type or float32 (checked by the binding).
  auto run = [&](auto* q_typed, auto* cache_typed) {
    using Q = std::remove_pointer_t<decltype(q_typed)>;
    using T = std::remove_pointer_t<decltype(cache_typed)>;
    decode_all<Q, T>(static_cast<Q*>(out), static_cast<const Q*>(q),
                     static_cast<const T*>(key_cache), static_cast<const T*>(value_cache),
                     block_tables, context_lens, shape, scale);
  };
  const bool float_q = q_type == kFloat32;
  switch (cache_type) {
    case kFloat32: run(static_cast<float*>(nullptr), static_cast<float*>(nullptr)); break;
    case kBFloat16:
      if (float_q) run(static_cast<float*>(nullptr), static_cast<c10::BFloat16*>(nullptr));
      else run(static_cast<c10::BFloat16*>(nullptr), static_cast<c10::BFloat16*>(nullptr));
      break;
    case kFloat16:
      if (float_q) run(static_cast<float*>(nullptr), static_cast<Half16*>(nullptr));
      else run(static_cast<Half16*>(nullptr), static_cast<Half16*>(nullptr));
      break;
  }
}

}  // namespace prolora
