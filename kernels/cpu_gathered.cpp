// Fused CPU kernel for a gathered group of the compact PRoLoRA apply (see cpu_backend.py).
//
// Semantics, for every row g (weights stacked per row, float32, contiguous):
//   z[k]   = sum_i sum_j x[g, i*cA + j] * A0[g, (k + i*sA) % R, j]       (k < R, i*cA + j < h)
//   su[q]  = sum_c Au[g, q, c] * x[g, c]                                  (q < u)
//   out[g, i*cB + j] = scale[g] * ( sum_c B0[g, j, c] * z[(c - i*sB) % R]
//                                   + sum_q Bu[g, i*cB + j, q] * su[q] )  (i*cB + j < o)
// shapes: x (G, h), A0 (G, R, cA), B0 (G, cB, R), Au (G, u, h), Bu (G, o, u), scale (G), out (G, o)
#include <torch/extension.h>

#include <vector>

static inline float dot(const float* a, const float* b, int64_t len) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t t = 0; t < len; ++t) acc += a[t] * b[t];
  return acc;
}

static void row_delta(const float* x, const float* a0, const float* b0, const float* au,
                      const float* bu, float scale, float* out, int64_t h, int64_t o, int64_t R,
                      int64_t u, int64_t m, int64_t n, int64_t cA, int64_t cB, int64_t sA,
                      int64_t sB) {
  std::vector<float> z(R > 0 ? R : 1, 0.f), rotated(R > 0 ? R : 1), su(u > 0 ? u : 1);
  for (int64_t i = 0; i < m && R > 0; ++i) {
    const int64_t start = i * cA;
    if (start >= h) break;
    const int64_t len = std::min(cA, h - start);
    for (int64_t k = 0; k < R; ++k) z[k] += dot(x + start, a0 + ((k + i * sA) % R) * cA, len);
  }
  for (int64_t q = 0; q < u; ++q) su[q] = dot(au + q * h, x, h);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < R; ++c) rotated[c] = z[((c - i * sB) % R + R) % R];
    for (int64_t j = 0; j < cB; ++j) {
      const int64_t row = i * cB + j;
      if (row >= o) return;
      float acc = R > 0 ? dot(b0 + j * R, rotated.data(), R) : 0.f;
      if (u > 0) acc += dot(bu + row * u, su.data(), u);
      out[row] = scale * acc;
    }
  }
}

torch::Tensor gathered_delta(torch::Tensor x, torch::Tensor a0, torch::Tensor b0, torch::Tensor au,
                             torch::Tensor bu, torch::Tensor scales, int64_t o, int64_t m,
                             int64_t n, int64_t sA, int64_t sB) {
  const int64_t G = x.size(0), h = x.size(1), R = a0.size(1), cA = a0.size(2), cB = b0.size(1);
  const int64_t u = au.size(1);
  auto out = torch::empty({G, o}, x.options());
  const float *px = x.data_ptr<float>(), *pa0 = a0.data_ptr<float>(), *pb0 = b0.data_ptr<float>();
  const float *pau = au.data_ptr<float>(), *pbu = bu.data_ptr<float>(), *ps = scales.data_ptr<float>();
  float* pout = out.data_ptr<float>();
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      row_delta(px + g * h, pa0 + g * R * cA, pb0 + g * cB * R, pau + g * u * h, pbu + g * o * u,
                ps[g], pout + g * o, h, o, R, u, m, n, cA, cB, sA, sB);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("gathered_delta", &gathered_delta, "compact PRoLoRA delta for a gathered group");
}
