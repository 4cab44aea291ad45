// Float32 matrix product c = op(a) @ op(b) of row-major 2-D arrays through a CBLAS sgemm (oneMKL's, which
// medjax loads and hands over with MedjaxSetSgemm), as an XLA FFI custom call (see
// medjax/models/native.py):
//
//   ta = 0: op(a) = a (m x k);  ta = 1: op(a) = a^T, a stored (k x m);  likewise tb for b (k x n).
//
// Why: XLA CPU's dot took 1.1-1.4x oneMKL's time on a ConvNeXt-Tiny block's six per-pixel MLP products,
// where one side is narrow (96 to 768 columns) and the other has up to 100,352 rows; its weight gradients
// (a^T @ g over all rows) were the slowest, 76 ms against oneMKL's 41 ms at the first stage. oneMKL runs
// single-threaded here (medjax selects its sequential layer) and the work is split across XLA's intra-op
// thread pool (medjax::RunRowTasks), so the two never compete for cores:
//
// - without ta, by rows of c: each task computes its rows of c from its rows of op(a);
// - with ta (a weight gradient: the contraction runs over a's stored rows), by the contraction: each task
//   computes a partial product over its slice of rows into its own buffer, and the last to finish adds the
//   partials in task order, so the result does not depend on scheduling.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm with 32-bit integers (the LP64 interface).
using Sgemm = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const float* a,
                       int lda, const float* b, int ldb, float beta, float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

std::atomic<Sgemm> sgemm{nullptr};

// The width RunRowTasks weighs a row of a product by, flops_per_row / 32: each task then does at least
// about 2 MFLOP, so small products run as one call.
int64_t RowWeight(int64_t flops_per_row) { return std::max<int64_t>(1, flops_per_row / 32); }

ffi::Future Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                   ffi::ResultBuffer<ffi::F32> c, int64_t ta, int64_t tb) {
  const Sgemm gemm = sgemm.load();
  if (gemm == nullptr) {
    ffi::Promise promise;
    ffi::Future future(promise);
    promise.SetError(ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                                "medjax_matmul: no sgemm was set (medjax loads oneMKL first)"));
    return future;
  }
  const int64_t m = c->dimensions()[0], n = c->dimensions()[1];
  const int64_t k = ta ? a.dimensions()[0] : a.dimensions()[1];
  const int64_t lda = a.dimensions()[1], ldb = b.dimensions()[1];
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  float* c_data = c->typed_data();
  const int op_a = ta ? kTrans : kNoTrans, op_b = tb ? kTrans : kNoTrans;
  if (!ta) {  // Rows of c, from the same rows of a.
    return medjax::RunRowTasks(pool, m, RowWeight(2 * k * n), [=](int64_t, int64_t r0, int64_t r1) {
      if (r1 > r0) {
        gemm(kRowMajor, op_a, op_b, r1 - r0, n, k, 1.0f, a_data + r0 * lda, lda, b_data, ldb, 0.0f,
             c_data + r0 * n, n);
      }
    });
  }
  // The contraction runs over a's (and b's, untransposed) stored rows: split it, then add the partials.
  const int64_t weight = RowWeight(2 * m * n);
  const int64_t tasks = medjax::RowTasks(pool, k, weight);
  auto partials = std::make_shared<std::vector<float>>((tasks - 1) * m * n);
  auto partial_product = [=](int64_t t, int64_t s0, int64_t s1) {
    float* out = t == 0 ? c_data : partials->data() + (t - 1) * m * n;
    if (s1 <= s0) {
      std::fill(out, out + m * n, 0.0f);
      return;
    }
    const float* b_rows = tb ? b_data + s0 : b_data + s0 * ldb;  // b^T's rows are b's columns.
    gemm(kRowMajor, op_a, op_b, m, n, s1 - s0, 1.0f, a_data + s0 * lda, lda, b_rows, ldb, 0.0f, out, n);
  };
  auto add_partials = [=]() {
    for (int64_t t = 1; t < tasks; ++t) {
      const float* __restrict p = partials->data() + (t - 1) * m * n;
      float* __restrict out = c_data;
      for (int64_t i = 0; i < m * n; ++i) out[i] += p[i];
    }
  };
  return medjax::RunRowTasks(pool, k, weight, partial_product, add_partials);
}

}  // namespace

extern "C" void MedjaxSetSgemm(void* fn) { sgemm.store(reinterpret_cast<Sgemm>(fn)); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ta")
                                  .Attr<int64_t>("tb"));
