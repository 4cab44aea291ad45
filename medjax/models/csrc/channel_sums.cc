// Per-channel sums of a and of a * b over every row of two (M, C) float32 arrays, as an XLA FFI custom call
// (see medjax/models/native.py):
//
//   sa[c] = sum over m of a[m, c],   sab[c] = sum over m of a[m, c] * b[m, c]
//
// BatchNorm's statistics are (x, x) (mean and mean square) and its backward reductions (g, x) (sum(g) and
// sum(g * x), from which sum(g * x_hat) follows). Why native: XLA CPU materialises the product a * b as its
// own pass and reduces each sum in a separate library call, four to five passes over the activations where
// one suffices; in MobileNetV2's training step these reductions were a third of the time (a bound measured
// by dropping them). Rows are split across XLA's intra-op thread pool; each task sums blocks of rows in
// float32 vectors and adds each block's sums into double, and the last task to finish adds the tasks'
// partial sums in a fixed order, so the result does not depend on scheduling (medjax::RunColumnSums in
// tasks.h). A second handler sums, in place of a, the cotangent of a clamp that follows a BatchNorm
// (ClampedSums, below).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "normalized_rows.h"
#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowBlock = 64;  // Rows summed in float32 before the block's sums go into double.

// Adds the sums of rows [m0, m1) of a and of a * b into sa and sab (C doubles each). a(ar, br, k) gives row
// r's value of a at channel k from a's row ar and b's row br: the array itself, or the clamp's masked
// cotangent (ClampedSums).
template <typename A>
void SumRows(A a, const float* __restrict a_data, const float* __restrict b, int64_t c, int64_t m0, int64_t m1,
             double* __restrict sa, double* __restrict sab) {
  std::vector<float> block_a(c), block_ab(c);
  for (int64_t r0 = m0; r0 < m1; r0 += kRowBlock) {
    std::fill(block_a.begin(), block_a.end(), 0.0f);
    std::fill(block_ab.begin(), block_ab.end(), 0.0f);
    float* __restrict pa = block_a.data();
    float* __restrict pab = block_ab.data();
    for (int64_t r = r0; r < std::min(m1, r0 + kRowBlock); ++r) {
      const float* __restrict ar = a_data + r * c;
      const float* __restrict br = b + r * c;
      for (int64_t k = 0; k < c; ++k) {
        const float ak = a(ar, br, k);
        pa[k] += ak;
        pab[k] += ak * br[k];
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      sa[k] += pa[k];
      sab[k] += pab[k];
    }
  }
}

ffi::Future ChannelSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                        ffi::ResultBuffer<ffi::F32> sa, ffi::ResultBuffer<ffi::F32> sab) {
  const int64_t m = a.dimensions()[0], c = a.dimensions()[1];
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  return medjax::RunColumnSums(pool, m, c, sa->typed_data(), sab->typed_data(),
                               [=](int64_t r0, int64_t r1, double* s_a, double* s_ab) {
                                 const auto itself = [](const float* ar, const float*, int64_t k) { return ar[k]; };
                                 SumRows(itself, a_data, b_data, c, r0, r1, s_a, s_ab);
                               });
}

// The backward sums of BatchNorm followed by a clamp to [lo, hi] (ReLU, ReLU6): sum(gm) and sum(gm * x) with
// gm the clamp's input gradient, g where the BatchNorm's output z lies strictly inside (lo, hi), else 0.
// The mask is recomputed from x, so the backward neither reads a saved z nor writes gm: XLA CPU wrote gm in
// a pass of its own (a select over g and z) and then read it twice, for these sums and for dx.
ffi::Future ClampedSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias,
                        ffi::ResultBuffer<ffi::F32> sg, ffi::ResultBuffer<ffi::F32> sgx, float lo, float hi) {
  const int64_t m = x.dimensions()[0], c = x.dimensions()[1];
  const float* g_data = g.typed_data();
  const float* x_data = x.typed_data();
  const medjax::Normalization norm{mean.typed_data(), mul.typed_data(), bias.typed_data(), lo, hi};
  return medjax::RunColumnSums(pool, m, c, sg->typed_data(), sgx->typed_data(),
                               [=](int64_t r0, int64_t r1, double* s_g, double* s_gx) {
                                 const auto masked = [=](const float* gr, const float* xr, int64_t k) {
                                   return norm.Masked(gr[k], xr[k], k);
                                 };
                                 SumRows(masked, g_data, x_data, c, r0, r1, s_g, s_gx);
                               });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxChannelSums, ChannelSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxClampedChannelSums, ClampedSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("lo")
                                  .Attr<float>("hi"));
