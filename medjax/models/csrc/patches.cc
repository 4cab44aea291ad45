// The patches of a dense 2-D convolution whose kernel does not tile its input (im2col), as an XLA FFI
// custom call (see medjax/models/native.py and layers._patches):
//
//   y[n, oh, ow, (i*kw + j)*C + c] = x[n, oh*sh + i, ow*sw + j, c]
//
// for an already padded (N, H, W, C) float32 x. Why native: XLA CPU computes this as one strided slice per
// tap and a concatenation, passes whose innermost axis is C floats wide; for MobileNetV2's stem (3x3,
// stride 2, C = 3, batch 32 at 224) the nine slices and the concatenation took 19 ms of the step. Here
// each tap row of a patch is kw*C consecutive floats of x, copied as one run. Output rows (n, oh) are split
// across XLA's intra-op thread pool (medjax::RunRowTasks).

#include <cstdint>

#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Future Patches(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t kh,
                    int64_t kw, int64_t sh, int64_t sw) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  const int64_t h = xd[1], w = xd[2], c = xd[3], ho = yd[1], wo = yd[2];
  const int64_t run = kw * c, patch = kh * run;
  const float* x_data = x.typed_data();
  float* y_data = y->typed_data();
  return medjax::RunRowTasks(pool, xd[0] * ho, wo * patch, [=](int64_t, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / ho, oh = r % ho;
      float* __restrict out = y_data + r * wo * patch;
      for (int64_t ow = 0; ow < wo; ++ow) {
        for (int64_t i = 0; i < kh; ++i, out += run) {
          const float* __restrict src = x_data + ((n * h + oh * sh + i) * w + ow * sw) * c;
          for (int64_t q = 0; q < run; ++q) out[q] = src[q];
        }
      }
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxPatches, Patches,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw"));
