// Fused CPU kernel for a gathered group of the compact PRoLoRA apply (see cpu_backend.py).
//
// Semantics, for every row g (weights stacked per row, float32, contiguous):
//   z[k]   = sum_i sum_j x[g, i*cA + j] * A0[g, (k + i*sA) % R, j]       (k < R, i*cA + j < h)
//   su[q]  = sum_c Au[g, q, c] * x[g, c]                                  (q < u)
//   out[g, i*cB + j] = scale[g] * ( sum_c B0t[g, c, j] * z[(c - i*sB) % R]
//                                   + sum_q But[g, q, i*cB + j] * su[q] ) (i*cB + j < o)
// shapes: x (G, h), A0 (G, R, cA), B0t (G, R, cB), Au (G, u, h), But (G, u, o), scale (G), out (G, o)
// The expand is written as axpys over contiguous output runs (B transposed) so it vectorizes.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

static inline float dot(const float* a, const float* b, int64_t len) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t t = 0; t < len; ++t) acc += a[t] * b[t];
  return acc;
}

static inline void axpy(float alpha, const float* in, float* out, int64_t len) {
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) out[t] += alpha * in[t];
}

struct Dims {
  int64_t h, o, R, u, m, n, cA, cB, sA, sB;
};

// scratch holds R + u floats.
static void row_delta(const float* x, const float* a0, const float* b0t, const float* au,
                      const float* but, float scale, float* out, const Dims& d, float* scratch) {
  float* z = scratch;
  float* su = scratch + d.R;
  std::fill(z, z + d.R, 0.f);
  for (int64_t i = 0; i < d.m && d.R > 0; ++i) {
    const int64_t start = i * d.cA;
    if (start >= d.h) break;
    const int64_t len = std::min(d.cA, d.h - start);
    // Each row of A0 is read once per chunk; its product lands on the rotated rank.
    for (int64_t row = 0; row < d.R; ++row) {
      z[((row - i * d.sA) % d.R + d.R) % d.R] += dot(x + start, a0 + row * d.cA, len);
    }
  }
  for (int64_t q = 0; q < d.u; ++q) su[q] = scale * dot(au + q * d.h, x, d.h);
  std::fill(out, out + d.o, 0.f);
  for (int64_t i = 0; i < d.n; ++i) {
    const int64_t first = i * d.cB;
    if (first >= d.o) break;
    const int64_t len = std::min(d.cB, d.o - first);
    for (int64_t c = 0; c < d.R; ++c) {
      const float zc = scale * z[((c - i * d.sB) % d.R + d.R) % d.R];
      axpy(zc, b0t + c * d.cB, out + first, len);
    }
  }
  for (int64_t q = 0; q < d.u; ++q) axpy(su[q], but + q * d.o, out, d.o);
}

torch::Tensor gathered_delta(torch::Tensor x, torch::Tensor a0, torch::Tensor b0t, torch::Tensor au,
                             torch::Tensor but, torch::Tensor scales, int64_t o, int64_t m,
                             int64_t n, int64_t sA, int64_t sB) {
  const int64_t G = x.size(0);
  const Dims d{x.size(1), o, a0.size(1), au.size(1), m, n, a0.size(2), b0t.size(2), sA, sB};
  auto out = torch::empty({G, o}, x.options());
  const float *px = x.data_ptr<float>(), *pa0 = a0.data_ptr<float>(), *pb0 = b0t.data_ptr<float>();
  const float *pau = au.data_ptr<float>(), *pbu = but.data_ptr<float>(), *ps = scales.data_ptr<float>();
  float* pout = out.data_ptr<float>();
  // Rows are independent; small groups stay on one thread (a pool hand-off costs more).
  at::parallel_for(0, G, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(d.R + d.u + 1);
    for (int64_t g = begin; g < end; ++g) {
      row_delta(px + g * d.h, pa0 + g * d.R * d.cA, pb0 + g * d.R * d.cB, pau + g * d.u * d.h,
                pbu + g * d.u * d.o, ps[g], pout + g * d.o, d, scratch.data());
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("gathered_delta", &gathered_delta, "compact PRoLoRA delta for a gathered group");
}
