// LayerNorm over the last axis of an (M, C) float32 array, forward and backward, as XLA FFI custom calls
// (see medjax/models/native.py):
//
//   forward:  mean[m], rstd[m] = 1 / sqrt(var[m] + eps),  y[m, c] = (x[m, c] - mean[m]) * rstd[m] * s[c] + b[c]
//   backward: with x_hat = (x - mean) * rstd and gs = g * s,
//             dx[m, c] = rstd[m] * (gs[m, c] - (sum_c gs + x_hat[m, c] * sum_c gs * x_hat) / C),
//             ds[c] = sum over m of g * x_hat,  db[c] = sum over m of g.
//
// Why native: XLA CPU reduces each row statistic in a separate library call that does not fuse its
// producers, and materialises x - mean, x_hat and g * s between them; a row of C <= 768 floats fits in L1, so
// each direction here is one pass over its inputs from memory (the row's second and third reads hit cache).
// In MedNeXt-tiny's training step the LayerNorms' reductions and elementwise passes were about a fifth of
// the time (profiled). Rows are split across XLA's intra-op thread pool. The backward's column sums ds
// and db follow channel_sums.cc: blocks of rows in float32, then into double, and the last task adds the
// tasks' partial sums in a fixed order (medjax::RunColumnSums), so results do not depend on scheduling.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kW = 16;              // Floats per vector: one AVX-512 register.
constexpr int64_t kRowBlock = 64;   // Rows whose column sums are added in float32 before going into double.
using V = medjax::Vec<kW>;

// Calls body(std::integral_constant<int, W>, k) over [0, c): vectors of kW, then single floats, so one
// body serves the vector part and the tail.
template <typename Body>
inline void ForSpans(int64_t c, Body body) {
  int64_t k = 0;
  for (; k + kW <= c; k += kW) body(std::integral_constant<int, kW>{}, k);
  for (; k < c; ++k) body(std::integral_constant<int, 1>{}, k);
}

// A row sum: a vector accumulator for the vector spans and a float for the tail, added in a fixed order.
struct RowSum {
  V lanes = {};
  float tail = 0.0f;
  template <typename T>  // V, or the tail's Vec<1>.
  void Add(const T& v) {
    if constexpr (std::is_same_v<T, V>) {
      lanes += v;
    } else {
      tail += v[0];
    }
  }
  float Total() const {
    float total = tail;
    for (int i = 0; i < kW; ++i) total += lanes[i];
    return total;
  }
};

void ForwardRows(const float* __restrict x, const float* __restrict s, const float* __restrict b, float eps,
                 int64_t c, int64_t m0, int64_t m1, float* __restrict y, float* __restrict mean_out,
                 float* __restrict rstd_out) {
  const float inv_c = 1.0f / static_cast<float>(c);
  for (int64_t r = m0; r < m1; ++r) {
    const float* __restrict xr = x + r * c;
    float* __restrict yr = y + r * c;
    RowSum sum;
    ForSpans(c, [&](auto w, int64_t k) { sum.Add(medjax::Load<w>(xr + k)); });
    const float mean = sum.Total() * inv_c;
    RowSum squares;  // Two passes over a row in cache: the variance without E[x^2] - E[x]^2's cancellation.
    ForSpans(c, [&](auto w, int64_t k) {
      const auto d = medjax::Load<w>(xr + k) - mean;
      squares.Add(d * d);
    });
    const float rstd = 1.0f / std::sqrt(squares.Total() * inv_c + eps);
    ForSpans(c, [&](auto w, int64_t k) {
      medjax::Store<w>(yr + k, (medjax::Load<w>(xr + k) - mean) * (medjax::Load<w>(s + k) * rstd) +
                                   medjax::Load<w>(b + k));
    });
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

ffi::Future Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                    ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  const int64_t m = x.dimensions()[0], c = x.dimensions()[1];
  const float* x_data = x.typed_data();
  const float* s_data = scale.typed_data();
  const float* b_data = bias.typed_data();
  float* y_data = y->typed_data();
  float* mean_data = mean->typed_data();
  float* rstd_data = rstd->typed_data();
  return medjax::RunRowTasks(pool, m, c, [=](int64_t, int64_t r0, int64_t r1) {
    ForwardRows(x_data, s_data, b_data, eps, c, r0, r1, y_data, mean_data, rstd_data);
  });
}

// dx for rows [m0, m1), and those rows' sums of g * x_hat and g added into ds and db (C doubles each).
void BackwardRows(const float* __restrict g, const float* __restrict x, const float* __restrict s,
                  const float* __restrict mean, const float* __restrict rstd, int64_t c, int64_t m0, int64_t m1,
                  float* __restrict dx, double* __restrict ds, double* __restrict db) {
  const float inv_c = 1.0f / static_cast<float>(c);
  std::vector<float> block_ds(c), block_db(c);
  float* __restrict bds = block_ds.data();
  float* __restrict bdb = block_db.data();
  for (int64_t r0 = m0; r0 < m1; r0 += kRowBlock) {
    std::fill(block_ds.begin(), block_ds.end(), 0.0f);
    std::fill(block_db.begin(), block_db.end(), 0.0f);
    for (int64_t r = r0; r < std::min(m1, r0 + kRowBlock); ++r) {
      const float* __restrict gr = g + r * c;
      const float* __restrict xr = x + r * c;
      float* __restrict dxr = dx + r * c;
      const float mu = mean[r], rs = rstd[r];
      RowSum sum_gs, sum_gs_xhat;
      ForSpans(c, [&](auto w, int64_t k) {
        const auto gs = medjax::Load<w>(gr + k) * medjax::Load<w>(s + k);
        sum_gs.Add(gs);
        sum_gs_xhat.Add(gs * ((medjax::Load<w>(xr + k) - mu) * rs));
      });
      const float a = sum_gs.Total() * inv_c, b = sum_gs_xhat.Total() * inv_c;
      ForSpans(c, [&](auto w, int64_t k) {
        const auto gv = medjax::Load<w>(gr + k);
        const auto x_hat = (medjax::Load<w>(xr + k) - mu) * rs;
        medjax::Store<w>(dxr + k, (gv * medjax::Load<w>(s + k) - (a + x_hat * b)) * rs);
        medjax::Store<w>(bds + k, medjax::Load<w>(bds + k) + gv * x_hat);
        medjax::Store<w>(bdb + k, medjax::Load<w>(bdb + k) + gv);
      });
    }
    for (int64_t k = 0; k < c; ++k) {
      ds[k] += bds[k];
      db[k] += bdb[k];
    }
  }
}

ffi::Future Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> x,
                     ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                     ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                     ffi::ResultBuffer<ffi::F32> dbias) {
  const int64_t m = x.dimensions()[0], c = x.dimensions()[1];
  const float* g_data = g.typed_data();
  const float* x_data = x.typed_data();
  const float* s_data = scale.typed_data();
  const float* mean_data = mean.typed_data();
  const float* rstd_data = rstd.typed_data();
  float* dx_data = dx->typed_data();
  return medjax::RunColumnSums(pool, m, c, dscale->typed_data(), dbias->typed_data(),
                               [=](int64_t r0, int64_t r1, double* ds, double* db) {
                                 BackwardRows(g_data, x_data, s_data, mean_data, rstd_data, c, r0, r1, dx_data,
                                              ds, db);
                               });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxLayerNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxLayerNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
