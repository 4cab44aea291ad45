// The kernel gradient of a depthwise 2-D convolution as an XLA FFI custom call (see medjax/models/native.py).
//
//   dk[i, j, c] = sum over (n, oh, ow) of xp[n, oh*sh + i*dh, ow*sw + j*dw, c] * g[n, oh, ow, c]
//
// xp is the padded NHWC input, g the NHWC output cotangent, dk is (kh, kw, 1, C); all float32. Why native:
// XLA CPU can only express this as one small fusion per tap per output row, each a separately dispatched
// thunk that re-reads its accumulator (medjax/models/depthwise.py); here each 16-channel accumulator
// stays in a vector register along an output row. Channels are split across XLA's intra-op thread pool
// (no partial sums to add), and the handler is asynchronous: it returns a future instead of blocking a
// pool thread, which could deadlock when every thread waits for work queued behind it.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, hp, wp, ho, wo, c, kh, kw, sh, sw, dh, dw;
};

constexpr int64_t kBlock = 16;  // Channels per accumulator: one AVX-512 (or two AVX2) registers.

// Adds to acc[j][0:width], for every tap column j of one tap row, the products of one output row with the
// input row that tap row reads. KW is the kernel width as a constant, so the KW accumulators of a 16-channel
// block live in registers and each cotangent vector is loaded once for all KW taps.
// kBlock floats as one GCC vector: AVX-512 registers where the CPU has them, register pairs otherwise.
typedef float Vec __attribute__((vector_size(kBlock * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));  // Unaligned load; compiles to one vector move.
  return v;
}

inline void Store(float* p, const Vec& v) { std::memcpy(p, &v, sizeof(Vec)); }

// Channels [k0, k0 + T*kBlock) of AccumulateRow: KW*T accumulators held in registers along the row, and the
// T cotangent vectors of a column loaded once for all KW taps. The T vectors of a tile are adjacent in memory,
// so each column step reads whole consecutive cache lines.
template <int64_t KW, int64_t T>
inline void AccumulateTile(const float* __restrict x_row, const float* __restrict g_row, float* __restrict acc,
                           const Geometry& s, int64_t width, int64_t k0) {
  const int64_t c = s.c, x_step = s.sw * s.c, tap_step = s.dw * s.c, wo = s.wo;
  Vec v[KW][T];
  for (int64_t j = 0; j < KW; ++j)
    for (int64_t t = 0; t < T; ++t) v[j][t] = Load(acc + j * width + k0 + t * kBlock);
  const float* xv = x_row + k0;
  const float* gv = g_row + k0;
  for (int64_t ow = 0; ow < wo; ++ow, xv += x_step, gv += c) {
    Vec gg[T];
    for (int64_t t = 0; t < T; ++t) gg[t] = Load(gv + t * kBlock);
    for (int64_t j = 0; j < KW; ++j)
      for (int64_t t = 0; t < T; ++t) v[j][t] += Load(xv + j * tap_step + t * kBlock) * gg[t];
  }
  for (int64_t j = 0; j < KW; ++j)
    for (int64_t t = 0; t < T; ++t) Store(acc + j * width + k0 + t * kBlock, v[j][t]);
}

// Adds to acc[j][0:width], for every tap column j of one tap row, the products of one output row with the
// input row that tap row reads. KW is the kernel width as a constant so that the accumulators of a channel
// tile fit the 32 vector registers of AVX-512: tiles of 4 vectors for KW <= 5, 3 for 7, 2 beyond.
template <int64_t KW>
void AccumulateRow(const float* __restrict x_row, const float* __restrict g_row, float* __restrict acc,
                   const Geometry& s, int64_t width) {
  constexpr int64_t kTile = KW <= 5 ? 4 : (KW <= 7 ? 3 : 2);
  int64_t k0 = 0;
  for (; k0 + kTile * kBlock <= width; k0 += kTile * kBlock) AccumulateTile<KW, kTile>(x_row, g_row, acc, s, width, k0);
  for (; k0 + kBlock <= width; k0 += kBlock) AccumulateTile<KW, 1>(x_row, g_row, acc, s, width, k0);
  const int64_t c = s.c, x_step = s.sw * s.c, tap_step = s.dw * s.c;
  for (; k0 < width; ++k0) {  // The channels left over from the vectors.
    for (int64_t j = 0; j < KW; ++j) {
      float v = acc[j * width + k0];
      for (int64_t ow = 0; ow < s.wo; ++ow) v += x_row[ow * x_step + j * tap_step + k0] * g_row[ow * c + k0];
      acc[j * width + k0] = v;
    }
  }
}

using RowFn = void (*)(const float*, const float*, float*, const Geometry&, int64_t);

// Kernel widths up to 11 (the models use 3, 5 and 7) get their own instance; wider ones go a column at a time.
RowFn RowFor(int64_t kw) {
  static constexpr RowFn kByWidth[] = {nullptr,           AccumulateRow<1>, AccumulateRow<2>, AccumulateRow<3>,
                                       AccumulateRow<4>,  AccumulateRow<5>, AccumulateRow<6>, AccumulateRow<7>,
                                       AccumulateRow<8>,  AccumulateRow<9>, AccumulateRow<10>, AccumulateRow<11>};
  return kw < 12 ? kByWidth[kw] : nullptr;
}

// dk for channels [c0, c1): a private (kh*kw, width) accumulator, written out at the end.
void KernelGradChannels(const float* xp, const float* g, float* dk, const Geometry& s, int64_t c0, int64_t c1) {
  const int64_t width = c1 - c0;
  std::unique_ptr<float[]> acc(new float[s.kh * s.kw * width]());
  const RowFn row_fn = RowFor(s.kw);
  for (int64_t n = 0; n < s.n; ++n) {
    for (int64_t oh = 0; oh < s.ho; ++oh) {
      const float* g_row = g + ((n * s.ho + oh) * s.wo) * s.c + c0;
      for (int64_t i = 0; i < s.kh; ++i) {
        const float* x_row = xp + ((n * s.hp + oh * s.sh + i * s.dh) * s.wp) * s.c + c0;
        float* acc_row = acc.get() + i * s.kw * width;
        if (row_fn != nullptr) {
          row_fn(x_row, g_row, acc_row, s, width);
          continue;
        }
        for (int64_t j = 0; j < s.kw; ++j) {  // One column at a time: its input row starts j*dw later.
          AccumulateRow<1>(x_row + j * s.dw * s.c, g_row, acc_row + j * width, s, width);
        }
      }
    }
  }
  for (int64_t t = 0; t < s.kh * s.kw; ++t) {
    std::copy(acc.get() + t * width, acc.get() + (t + 1) * width, dk + t * s.c + c0);
  }
}

ffi::Future KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> g,
                       ffi::ResultBuffer<ffi::F32> dk, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                       int64_t dh, int64_t dw) {
  auto xd = xp.dimensions();
  auto gd = g.dimensions();
  const Geometry s{xd[0], xd[1], xd[2], gd[1], gd[2], xd[3], kh, kw, sh, sw, dh, dw};
  // Channel chunks of whole blocks, at most one per thread (the last may be shorter).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t blocks = (s.c + kBlock - 1) / kBlock;
  const int64_t chunk = kBlock * ((blocks + threads - 1) / threads);
  const int64_t tasks = (s.c + chunk - 1) / chunk;

  ffi::Promise promise;
  ffi::Future future(promise);
  auto remaining = std::make_shared<std::atomic<int64_t>>(tasks);
  const float* x_data = xp.typed_data();
  const float* g_data = g.typed_data();
  float* dk_data = dk->typed_data();
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t c0 = t * chunk, c1 = std::min(s.c, c0 + chunk);
    pool.Schedule([=]() mutable {
      KernelGradChannels(x_data, g_data, dk_data, s, c0, c1);
      if (remaining->fetch_sub(1) == 1) promise.SetAvailable();
    });
  }
  return future;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxDepthwiseKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw"));
