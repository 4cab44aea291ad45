// The kernel gradient of a depthwise 2-D convolution as an XLA FFI custom call (see medjax/models/native.py).
//
//   dk[i, j, c] = sum over (n, oh, ow) of x[n, oh*sh + i*dh - pt, ow*sw + j*dw - pl, c] * g[n, oh, ow, c]
//
// x is the NHWC input, read as zero outside its H x W (the padding is implicit: taps that land in it are
// skipped, no padded copy is made), g the NHWC output cotangent, dk is (kh, kw, 1, C); all float32. Why native:
// XLA CPU can only express this as one small fusion per tap per output row, each a separately dispatched
// thunk that re-reads its accumulator (medjax/models/depthwise.py); here each 16-channel accumulator
// stays in a vector register along an output row. Output rows are split across XLA's intra-op thread pool,
// each chunk's sums added at the end (medjax::RunRowTasks, tasks.h).

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "normalized_rows.h"
#include "simd.h"
#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, ho, wo, c, kh, kw, sh, sw, dh, dw, pt, pl;
};

constexpr int64_t kBlock = 16;  // Channels per accumulator: one AVX-512 (or two AVX2) registers.
using Vec = medjax::Vec<kBlock>;
using medjax::Load;
using medjax::Store;

// The tap columns [j0, j0 + KW) of one tap row, and the output columns [lo, hi) for which all of them land
// inside the input row (the others are near the edges, in the padding for some tap).
struct Columns {
  int64_t j0, lo, hi;
};

template <int64_t KW>
Columns InteriorColumns(const Geometry& s, int64_t j0) {
  // ow*sw + j0*dw - pl >= 0 and ow*sw + (j0 + KW - 1)*dw - pl <= w - 1.
  const int64_t first = j0 * s.dw - s.pl, last = (j0 + KW - 1) * s.dw - s.pl;
  const int64_t lo = std::min(s.wo, first >= 0 ? int64_t{0} : (-first + s.sw - 1) / s.sw);
  const int64_t room = s.w - 1 - last;
  return {j0, lo, room < 0 ? lo : std::clamp<int64_t>(room / s.sw + 1, lo, s.wo)};
}

// Channels [k0, k0 + T*kBlock) of AccumulateRow over the interior columns: KW*T accumulators held in
// registers along the row, and the T cotangent vectors of a column loaded once for all KW taps. The T vectors
// of a tile are adjacent in memory, so each column step reads whole consecutive cache lines.
template <int64_t KW, int64_t T>
inline void AccumulateTile(const float* __restrict x_row, const float* __restrict g_row, float* __restrict acc,
                           const Geometry& s, int64_t width, int64_t k0, Columns cols) {
  const int64_t c = s.c, x_step = s.sw * s.c, tap_step = s.dw * s.c;
  Vec v[KW][T];
  for (int64_t j = 0; j < KW; ++j)
    for (int64_t t = 0; t < T; ++t) v[j][t] = Load<kBlock>(acc + j * width + k0 + t * kBlock);
  const float* xv = x_row + (cols.lo * s.sw + cols.j0 * s.dw - s.pl) * c + k0;
  const float* gv = g_row + cols.lo * c + k0;
  for (int64_t ow = cols.lo; ow < cols.hi; ++ow, xv += x_step, gv += c) {
    Vec gg[T];
    for (int64_t t = 0; t < T; ++t) gg[t] = Load<kBlock>(gv + t * kBlock);
    for (int64_t j = 0; j < KW; ++j)
      for (int64_t t = 0; t < T; ++t) v[j][t] += Load<kBlock>(xv + j * tap_step + t * kBlock) * gg[t];
  }
  for (int64_t j = 0; j < KW; ++j)
    for (int64_t t = 0; t < T; ++t) Store<kBlock>(acc + j * width + k0 + t * kBlock, v[j][t]);
}

// Output column ow's products for the taps of [j0, j0 + KW) that land inside the input row, all channels.
template <int64_t KW>
inline void AccumulateEdgeColumn(const float* __restrict x_row, const float* __restrict g_row,
                                 float* __restrict acc, const Geometry& s, int64_t width, int64_t j0, int64_t ow) {
  for (int64_t j = 0; j < KW; ++j) {
    const int64_t col = ow * s.sw + (j0 + j) * s.dw - s.pl;
    if (col < 0 || col >= s.w) continue;
    const float* xv = x_row + col * s.c;
    const float* gv = g_row + ow * s.c;
    float* a = acc + j * width;
    for (int64_t k = 0; k < width; ++k) a[k] += xv[k] * gv[k];
  }
}

// Adds to acc[j][0:width], for tap columns j0 + j (j < KW) of one tap row, the products of one output row with
// the input row that tap row reads (x_row: its column 0). KW is the kernel width as a constant so that the
// accumulators of a channel tile fit the 32 vector registers of AVX-512: tiles of 4 vectors for KW <= 5, 3 for
// 7, 2 beyond. The few columns near the edges, where some taps land in the padding, go one at a time.
template <int64_t KW>
void AccumulateRow(const float* __restrict x_row, const float* __restrict g_row, float* __restrict acc,
                   const Geometry& s, int64_t width, int64_t j0) {
  constexpr int64_t kTile = KW <= 5 ? 4 : (KW <= 7 ? 3 : 2);
  const Columns cols = InteriorColumns<KW>(s, j0);
  int64_t k0 = 0;
  for (; k0 + kTile * kBlock <= width; k0 += kTile * kBlock)
    AccumulateTile<KW, kTile>(x_row, g_row, acc, s, width, k0, cols);
  for (; k0 + kBlock <= width; k0 += kBlock) AccumulateTile<KW, 1>(x_row, g_row, acc, s, width, k0, cols);
  const int64_t c = s.c, x_step = s.sw * s.c;
  for (; k0 < width; ++k0) {  // The channels left over from the vectors.
    for (int64_t j = 0; j < KW; ++j) {
      float v = acc[j * width + k0];
      const float* xv = x_row + ((j0 + j) * s.dw - s.pl) * c + k0;
      for (int64_t ow = cols.lo; ow < cols.hi; ++ow) v += xv[ow * x_step] * g_row[ow * c + k0];
      acc[j * width + k0] = v;
    }
  }
  for (int64_t ow = 0; ow < cols.lo; ++ow) AccumulateEdgeColumn<KW>(x_row, g_row, acc, s, width, j0, ow);
  for (int64_t ow = cols.hi; ow < s.wo; ++ow) AccumulateEdgeColumn<KW>(x_row, g_row, acc, s, width, j0, ow);
}

// For a stride-1 undilated row (tap j of output column ow reads input column ow + j - pl): adds to the KW x T
// accumulators a, channels [k0, k0 + T * kBlock), the products of output columns [ow0, ow0 + COLS). The
// cotangent vectors stay in registers and each of the COLS + KW - 1 input vectors is loaded once and
// multiplied into every accumulator it reaches: COLS + KW - 1 input loads instead of COLS * KW tap by tap
// (AccumulateTile). T = 2 channel vectors give two independent chains of additions per tap, which keeps
// both multiply-add units busy. kChecked skips input columns outside the row (the padding), at the edges.
template <int64_t KW, int T, int COLS, bool kChecked>
inline void SlidingColumns(const float* __restrict x_row, const float* __restrict g_row, Vec (*__restrict a)[T],
                           const Geometry& s, int64_t k0, int64_t ow0) {
  Vec gg[COLS][T];
#pragma GCC unroll 16
  for (int o = 0; o < COLS; ++o)
    for (int t = 0; t < T; ++t) gg[o][t] = Load<kBlock>(g_row + (ow0 + o) * s.c + k0 + t * kBlock);
  const int64_t first = ow0 - s.pl;  // The input column of output ow0's tap 0.
#pragma GCC unroll 32
  for (int p = 0; p < COLS + KW - 1; ++p) {
    if (kChecked && (first + p < 0 || first + p >= s.w)) continue;
    Vec v[T];
    for (int t = 0; t < T; ++t) v[t] = Load<kBlock>(x_row + (first + p) * s.c + k0 + t * kBlock);
#pragma GCC unroll 8
    for (int j = 0; j < KW; ++j) {
      if (p - j >= 0 && p - j < COLS) {
        for (int t = 0; t < T; ++t) a[j][t] += v[t] * gg[p - j][t];
      }
    }
  }
}

template <int64_t KW, int T, int COLS>
inline void Sliding(const float* x_row, const float* g_row, Vec (*a)[T], const Geometry& s, int64_t k0,
                    int64_t ow0) {
  if (ow0 - s.pl >= 0 && ow0 - s.pl + COLS + KW - 1 <= s.w) {
    SlidingColumns<KW, T, COLS, false>(x_row, g_row, a, s, k0, ow0);
  } else {
    SlidingColumns<KW, T, COLS, true>(x_row, g_row, a, s, k0, ow0);
  }
}

// Channels [k0, k0 + T * kBlock) of SlidingRow.
template <int64_t KW, int T>
inline void SlidingRowChannels(const float* __restrict x_row, const float* __restrict g_row,
                               float* __restrict acc, const Geometry& s, int64_t width, int64_t k0) {
  constexpr int kCols = T == 1 ? 16 : 8;
  Vec a[KW][T];
  for (int64_t j = 0; j < KW; ++j)
    for (int t = 0; t < T; ++t) a[j][t] = Load<kBlock>(acc + j * width + k0 + t * kBlock);
  int64_t ow = 0;
  for (; ow + kCols <= s.wo; ow += kCols) Sliding<KW, T, kCols>(x_row, g_row, a, s, k0, ow);
  for (; ow + 4 <= s.wo; ow += 4) Sliding<KW, T, 4>(x_row, g_row, a, s, k0, ow);
  for (; ow < s.wo; ++ow) Sliding<KW, T, 1>(x_row, g_row, a, s, k0, ow);
  for (int64_t j = 0; j < KW; ++j)
    for (int t = 0; t < T; ++t) Store<kBlock>(acc + j * width + k0 + t * kBlock, a[j][t]);
}

// AccumulateRow for a stride-1 undilated row and a width of whole vectors: per pair of channel vectors (then
// a last single one), the accumulators in registers along the row, in tiles of output columns.
template <int64_t KW>
void SlidingRow(const float* __restrict x_row, const float* __restrict g_row, float* __restrict acc,
                const Geometry& s, int64_t width, int64_t) {
  int64_t k0 = 0;
  for (; k0 + 2 * kBlock <= width; k0 += 2 * kBlock) SlidingRowChannels<KW, 2>(x_row, g_row, acc, s, width, k0);
  for (; k0 < width; k0 += kBlock) SlidingRowChannels<KW, 1>(x_row, g_row, acc, s, width, k0);
}

using RowFn = void (*)(const float*, const float*, float*, const Geometry&, int64_t, int64_t);

// Kernel widths up to 11 (the models use 3, 5 and 7) get their own instance; wider ones go a column at a time.
// Stride-1 undilated rows of kernel width 5 or 7 over whole vectors of channels take SlidingRow, with AVX-512's
// 32 registers (a tile's cotangent vectors and accumulators): ConvNeXt-Tiny's 7x7 kernel gradients took 36 ms
// per step against 58 tap by tap. 3x3 kernels stay tap by tap: MobileNetV2's are bound by memory, and sliding
// tiles measured no faster there.
RowFn RowFor(const Geometry& s, int64_t width) {
#if defined(__AVX512F__)
  if (s.sw == 1 && s.dw == 1 && width % kBlock == 0) {
    if (s.kw == 7) return SlidingRow<7>;
    if (s.kw == 5) return SlidingRow<5>;
  }
#endif
  static constexpr RowFn kByWidth[] = {nullptr,           AccumulateRow<1>, AccumulateRow<2>, AccumulateRow<3>,
                                       AccumulateRow<4>,  AccumulateRow<5>, AccumulateRow<6>, AccumulateRow<7>,
                                       AccumulateRow<8>,  AccumulateRow<9>, AccumulateRow<10>, AccumulateRow<11>};
  return s.kw < 12 ? kByWidth[s.kw] : nullptr;
}

// Adds the sums over one output row's columns of its cotangent, channels [0, width), into db.
void AddRowSums(const float* __restrict g_row, const Geometry& s, int64_t width, double* __restrict db) {
  std::vector<float> row(width, 0.0f);
  float* __restrict sums = row.data();
  for (int64_t ow = 0; ow < s.wo; ++ow) {
    const float* __restrict gv = g_row + ow * s.c;
    for (int64_t k = 0; k < width; ++k) sums[k] += gv[k];
  }
  for (int64_t k = 0; k < width; ++k) db[k] += sums[k];
}

// The sums over output rows [r0, r1) of the flattened (n, oh) index, all channels, added into acc (kh*kw rows
// of C floats, dk's layout) and, when bias_sums is not null, the cotangent's sums into bias_sums (C doubles;
// per output row in float, then in double). With a normalization, the input rows are its
// (normalized_rows.h), each computed once per task.
void AccumulateRows(const float* x, const float* g, const Geometry& s, const medjax::Normalization* norm,
                    int64_t r0, int64_t r1, float* acc, double* bias_sums) {
  const int64_t width = s.c;
  const RowFn row_fn = RowFor(s, width);
  std::optional<medjax::NormalizedRows> normalized;
  if (norm != nullptr) normalized.emplace(x, s.h, s.w, s.c, *norm, s.kh, 0, s.c);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / s.ho, oh = r % s.ho;
    const float* g_row = g + r * s.wo * s.c;
    if (bias_sums != nullptr) AddRowSums(g_row, s, width, bias_sums);
    for (int64_t i = 0; i < s.kh; ++i) {
      const int64_t ih = oh * s.sh + i * s.dh - s.pt;
      if (ih < 0 || ih >= s.h) continue;  // The tap row is in the padding.
      const float* x_row = normalized ? normalized->data() + normalized->Slot(n, ih) * s.w * s.c
                                      : x + ((n * s.h + ih) * s.w) * s.c;
      float* acc_row = acc + i * s.kw * width;
      if (row_fn != nullptr) {
        row_fn(x_row, g_row, acc_row, s, width, 0);
        continue;
      }
      for (int64_t j = 0; j < s.kw; ++j) AccumulateRow<1>(x_row, g_row, acc_row + j * width, s, width, j);
    }
  }
}

// Output rows in contiguous chunks, one per thread (medjax::RunRowTasks), each summed into its own
// accumulators; the last task to finish adds the chunks' sums in chunk order, so the result does not depend
// on scheduling. Why rows, not channels: each thread then streams whole rows of x and g, as the forward
// kernel does. Split by channels, both threads read a part of every column: MobileNetV2's 3x3 kernel
// gradients from a BatchNorm's input, at its layer shapes (batch 32, 224), took 92 ms in all split by
// channels and 54-56 ms split by rows.
ffi::Future Run(ffi::ThreadPool& pool, const float* x_data, const float* g_data, float* dk_data, float* db_data,
                const Geometry& s, std::optional<medjax::Normalization> norm) {
  const int64_t rows = s.n * s.ho, size = s.kh * s.kw * s.c;
  const int64_t tasks = medjax::RowTasks(pool, rows, s.wo * s.c);  // RunRowTasks' split, below
  auto acc = std::make_shared<std::vector<float>>(tasks * size, 0.0f);
  auto bias_sums = std::make_shared<std::vector<double>>(db_data != nullptr ? tasks * s.c : 0, 0.0);
  auto task_sums = [=](int64_t t, int64_t r0, int64_t r1) {
    AccumulateRows(x_data, g_data, s, norm ? &*norm : nullptr, r0, r1, acc->data() + t * size,
                   db_data != nullptr ? bias_sums->data() + t * s.c : nullptr);
  };
  auto add_tasks = [=]() {
    for (int64_t k = 0; k < size; ++k) {
      float total = 0.0f;
      for (int64_t t = 0; t < tasks; ++t) total += (*acc)[t * size + k];
      dk_data[k] = total;
    }
    if (db_data == nullptr) return;
    for (int64_t k = 0; k < s.c; ++k) {
      double total = 0.0;
      for (int64_t t = 0; t < tasks; ++t) total += (*bias_sums)[t * s.c + k];
      db_data[k] = static_cast<float>(total);
    }
  };
  return medjax::RunRowTasks(pool, rows, s.wo * s.c, task_sums, add_tasks);
}

Geometry MakeGeometry(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& g, int64_t kh, int64_t kw,
                      int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl) {
  auto xd = x.dimensions();
  auto gd = g.dimensions();
  return Geometry{xd[0], xd[1], xd[2], gd[1], gd[2], xd[3], kh, kw, sh, sw, dh, dw, pt, pl};
}

ffi::Future KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                       ffi::ResultBuffer<ffi::F32> dk, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                       int64_t dh, int64_t dw, int64_t pt, int64_t pl) {
  const Geometry s = MakeGeometry(x, g, kh, kw, sh, sw, dh, dw, pt, pl);
  return Run(pool, x.typed_data(), g.typed_data(), dk->typed_data(), nullptr, s, std::nullopt);
}

// The kernel gradient and the bias's, the cotangent's per-channel sums, from the cotangent rows the kernel
// gradient reads anyway (XLA reduced them in a pass of their own).
ffi::Future KernelAndBiasGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                              ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> db, int64_t kh,
                              int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl) {
  const Geometry s = MakeGeometry(x, g, kh, kw, sh, sw, dh, dw, pt, pl);
  return Run(pool, x.typed_data(), g.typed_data(), dk->typed_data(), db->typed_data(), s, std::nullopt);
}

// The kernel gradient of a depthwise convolution whose input is clamp(BatchNorm(x)) (normalized_rows.h), from
// x. Undilated kernels only (NormalizedRows' slots).
ffi::Future NormalizedKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                                 ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> g,
                                 ffi::ResultBuffer<ffi::F32> dk, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                 int64_t pt, int64_t pl, float lo, float hi) {
  const Geometry s = MakeGeometry(x, g, kh, kw, sh, sw, 1, 1, pt, pl);
  const medjax::Normalization norm{mean.typed_data(), mul.typed_data(), bias.typed_data(), lo, hi};
  return Run(pool, x.typed_data(), g.typed_data(), dk->typed_data(), nullptr, s, norm);
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
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxNormalizedDepthwiseKernelGrad, NormalizedKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<float>("lo")
                                  .Attr<float>("hi"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxDepthwiseKernelAndBiasGrad, KernelAndBiasGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));
