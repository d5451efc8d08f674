// Python bindings of the CPU kernels: tensor checks here, arithmetic in cpu_gathered.cpp and
// cpu_attention.cpp (whose translation units stay free of the heavy torch headers).
#include <torch/extension.h>

#include <vector>

#include "cpu_kernels.h"

namespace {

using prolora::ElementType;

ElementType element_type_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return prolora::kFloat32;
    case torch::kBFloat16: return prolora::kBFloat16;
    case torch::kHalf: return prolora::kFloat16;
    default: TORCH_CHECK(false, "expected float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void gathered_apply(std::vector<torch::Tensor> ys, torch::Tensor x, torch::Tensor row_slots,
                    std::vector<torch::Tensor> tables, std::vector<torch::Tensor> scales,
                    int64_t weight_type) {
  TORCH_CHECK(ys.size() == tables.size() && ys.size() == scales.size(),
              "one output, table and scales per module");
  x = x.contiguous();  // no copy when it already is
  TORCH_CHECK(x.dim() == 2, "x must be (T, h)");
  const ElementType x_type = element_type_of(x);
  TORCH_CHECK(row_slots.numel() == x.size(0) && row_slots.scalar_type() == torch::kLong &&
                  row_slots.is_contiguous(), "row_slots must be (T,) int64");
  TORCH_CHECK(weight_type >= prolora::kFloat32 && weight_type <= prolora::kFloat16,
              "weight_type must be 0 (float32), 1 (bfloat16) or 2 (float16)");
  std::vector<prolora::ModuleTable> modules;
  for (size_t j = 0; j < ys.size(); ++j) {
    const auto &y = ys[j], &table = tables[j], &scale = scales[j];
    TORCH_CHECK(y.is_contiguous() && y.dim() == 2 && y.size(0) == x.size(0),
                "the cpu backend adds into contiguous (T, o) outputs");
    TORCH_CHECK(table.dim() == 2 && table.size(1) == prolora::kNumFields && table.is_contiguous() &&
                    table.scalar_type() == torch::kLong, "table must be (S, ", prolora::kNumFields,
                ") int64");
    TORCH_CHECK(scale.numel() == table.size(0) && scale.scalar_type() == torch::kFloat &&
                    scale.is_contiguous(), "scales must be (S,) float32");
    modules.push_back({y.data_ptr(), element_type_of(y), y.size(1), table.data_ptr<int64_t>(),
                       table.size(0), scale.data_ptr<float>()});
  }
  prolora::gathered_apply(modules.data(), static_cast<int64_t>(modules.size()), x.data_ptr(), x_type,
                          x.size(0), x.size(1), row_slots.data_ptr<int64_t>(),
                          static_cast<prolora::ElementType>(weight_type));
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor key_cache,
                                     torch::Tensor value_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous (S, Hq, D)");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes() &&
                  key_cache.is_contiguous() && value_cache.is_contiguous(),
              "key/value caches must be contiguous (num_blocks, block_size, Hkv, D)");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "the caches share a dtype");
  TORCH_CHECK(q.scalar_type() == key_cache.scalar_type() || q.scalar_type() == torch::kFloat,
              "q has the caches' dtype, or float32 over a 16-bit cache");
  const int64_t num_seqs = q.size(0), q_heads = q.size(1), kv_heads = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == q.size(2) && q_heads % kv_heads == 0,
              "head_dim must match and q heads be a multiple of kv heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs &&
                  block_tables.scalar_type() == torch::kLong && block_tables.is_contiguous(),
              "block_tables must be contiguous (S, W) int64");
  TORCH_CHECK(context_lens.numel() == num_seqs && context_lens.scalar_type() == torch::kLong &&
                  context_lens.is_contiguous(), "context_lens must be (S,) int64");
  auto out = torch::empty_like(q);
  if (num_seqs == 0) return out;
  const int64_t block_size = key_cache.size(1), width = block_tables.size(1);
  const auto lens = context_lens.accessor<int64_t, 1>();
  const auto tables = block_tables.accessor<int64_t, 2>();
  for (int64_t s = 0; s < num_seqs; ++s) {  // every address the kernel forms is in the cache
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= width * block_size, "context length out of range");
    for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[s][b] >= 0 && tables[s][b] < key_cache.size(0), "block id out of range");
  }
  const prolora::DecodeShape shape{num_seqs, q_heads, kv_heads, q.size(2), block_size, width};
  prolora::paged_decode_attention(out.data_ptr(), q.data_ptr(), element_type_of(q),
                                  key_cache.data_ptr(), value_cache.data_ptr(),
                                  element_type_of(key_cache),
                                  block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                                  shape, static_cast<float>(scale));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("gathered_apply", &gathered_apply,
             "ys[j][t] += compact PRoLoRA delta of row t's adapter for module j, read from its slot table");
  module.def("paged_decode_attention", &paged_decode_attention,
             "one query token per sequence attending over its paged key/value cache");
  module.attr("NUM_FIELDS") = static_cast<int64_t>(prolora::kNumFields);
}
