// Fused CPU kernel for a gathered group of the compact PRoLoRA apply (see cpu_backend.py).
//
// Semantics, for every row g of the group, t = rows[g] (g when rows is empty), a = index[g]:
//   z[k]   = sum_i sum_j x[t, i*cA + j] * A0[a, (k + i*sA) % R, j]       (k < R, i*cA + j < h)
//   su[q]  = sum_c Au[a, q, c] * x[t, c]                                  (q < u)
//   y[t, i*cB + j] += scale[a] * ( sum_c B0t[a, c, j] * z[(c - i*sB) % R]
//                                  + sum_q But[a, q, i*cB + j] * su[q] )  (i*cB + j < o)
// shapes: x (T, h), y (T, o), rows (G) or (0), index (G), A0 (S, R, cA), B0t (S, R, cB),
//         Au (S, u, h), But (S, u, o), scale (S); float32, contiguous.
// Each row reads x[t] and adds into y[t] in place: the group costs one call and no temporaries.
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

constexpr int64_t kRowsPerThread = 64;

struct Dims {
  int64_t h, o, R, u, m, n, cA, cB, sA, sB;
};

// Adds one row's delta into out; scratch holds R + u floats.
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

void gathered_apply(torch::Tensor y, torch::Tensor x, torch::Tensor rows, torch::Tensor index,
                    torch::Tensor a0,
                    torch::Tensor b0t, torch::Tensor au, torch::Tensor but, torch::Tensor scales,
                    int64_t m, int64_t n, int64_t sA, int64_t sB) {
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous(), "x and y must be contiguous");
  TORCH_CHECK(y.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat, "float32 only");
  const int64_t G = index.size(0);
  const int64_t* pidx = index.data_ptr<int64_t>();
  const Dims d{x.size(1), y.size(1), a0.size(1), au.size(1), m, n, a0.size(2), b0t.size(2), sA, sB};
  const bool all_rows = rows.numel() == 0;
  const int64_t* prow = all_rows ? nullptr : rows.data_ptr<int64_t>();
  const float *px = x.data_ptr<float>(), *pa0 = a0.data_ptr<float>(), *pb0 = b0t.data_ptr<float>();
  const float *pau = au.data_ptr<float>(), *pbu = but.data_ptr<float>(), *ps = scales.data_ptr<float>();
  float* py = y.data_ptr<float>();
  // Rows are independent and distinct. A row costs a few microseconds, about what waking a
  // second thread costs, so decode-sized groups stay on the calling thread.
  at::parallel_for(0, G, kRowsPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(d.R + d.u + 1);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t row = all_rows ? g : prow[g];
      const int64_t a = pidx[g];
      row_delta(px + row * d.h, pa0 + a * d.R * d.cA, pb0 + a * d.R * d.cB, pau + a * d.u * d.h,
                pbu + a * d.u * d.o, ps[a], py + row * d.o, d, scratch.data());
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("gathered_apply", &gathered_apply, "y[rows] += compact PRoLoRA delta, gathered group");
}
