// The CPU kernels' entry points, on raw pointers: cpu_bindings.cpp checks the tensors and calls
// them. Each definition documents its Semantics next to the code.
#pragma once

#include <cstdint>
#include <type_traits>

namespace prolora {

// Element types of adapter weights and KV caches (codes shared with the Python side).
enum ElementType : int64_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Columns of the adapter slot table (slot_tables.py TABLE_FIELDS).
enum Field : int64_t { kPresent, kA0, kB0t, kAu, kBut, kR, kU, kM, kN, kCA, kCB, kSA, kSB, kNumFields };

// One adapted module of a gathered_apply call: its output rows and its slot table.
struct ModuleTable {
  void* y;  // (num_rows, out_features) of y_type
  ElementType y_type;
  int64_t out_features;
  const int64_t* table;  // (num_slots, kNumFields)
  int64_t num_slots;
  const float* scales;  // (num_slots,)
};

void gathered_apply(const ModuleTable* modules, int64_t num_modules, const void* x,
                    ElementType x_type, int64_t num_rows, int64_t in_features,
                    const int64_t* row_slots, ElementType weight_type);

struct DecodeShape {
  int64_t num_seqs, q_heads, kv_heads, head_dim, block_size, table_width;
};

void paged_decode_attention(void* out, const void* q, ElementType q_type, const void* key_cache,
                            const void* value_cache, ElementType cache_type,
                            const int64_t* block_tables, const int64_t* context_lens,
                            const DecodeShape& shape, float scale);

// Calls fn(std::integral_constant<int, count>) for 1 <= count <= 8 (8 for anything larger), so a
// loop over `count` accumulators is unrolled with the accumulators in registers.
template <typename Fn>
inline void dispatch_up_to_8(int64_t count, Fn&& fn) {
  switch (count) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace prolora
