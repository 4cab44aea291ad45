// The forward pass of a depthwise 2-D convolution (a correlation, as deep learning defines it) as an XLA FFI
// custom call (see medjax/models/native.py):
//
//   y[n, oh, ow, c] = sum over (i, j) of xe[n, oh*sh + i*dh - pt, ow*sw + j*dw - pl, c] * k[i, j, 0, c]
//
// xe is the NHWC input x dilated by (eh, ew) (xe[p, q] = x[p/eh, q/ew] where both divide, else zero) and read
// as zero outside its bounds: the padding (pt rows above, pl columns to the left, the rest follows from y's
// shape) and the dilation are implicit, never materialised. k is (kh, kw, 1, C); y is (N, Ho, Wo, C); all
// float32. With (eh, ew) = (1, 1) this is the forward pass; with the stride as (eh, ew), output stride 1 and
// the flipped kernel it is the input gradient of a strided convolution (the stride and the input dilation
// are not both above 1 along an axis). Why native: XLA CPU computes these as one fusion summing kh*kw
// strided slices of a padded (and dilated) copy: 2.4x PyTorch's time for ConvNeXt's 7x7 on 56x56x96
// (launch/bench_convnext_parts.py), 4x the forward's time for MobileNetV2's 112x112 stride-2 input gradient.
// Here a tile of COLS output columns by T channel vectors stays in registers across every tap, each tap's
// kernel vectors are loaded once per tile, and taps that land in the padding or between dilated elements
// are skipped. Output columns are taken in ew phases (ow = q + ew*m), within which the same taps are
// valid and consecutive outputs read consecutive input columns. Output rows (n, oh) are split across XLA's
// intra-op thread pool (medjax::RunTasks, tasks.h). With the `stream` attribute (native.py sets it for
// outputs larger than the last-level cache) each row is computed into a per-task buffer and then written
// with streaming stores (medjax::StreamCopy, simd.h).

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "normalized_rows.h"
#include "simd.h"
#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using medjax::Load;
using medjax::Store;
using medjax::Vec;

struct Geometry {
  int64_t n, h, w, c, ho, wo, kh, kw, sh, sw, dh, dw, pt, pl, eh, ew;
  const float* bias;  // Where each channel's sum starts: the layer's bias (C floats), or nullptr for zero.
  bool stream;        // Rows go to y through a row buffer and streaming stores.
};

// The starting value of the sums of channels [c0, c0 + W): the bias, or zero.
template <int W>
inline Vec<W> Start(const Geometry& s, int64_t c0) {
  return s.bias != nullptr ? Load<W>(s.bias + c0) : Vec<W>{};
}

// Floor division and its remainder for a possibly negative numerator and a positive divisor.
inline int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// A tap that lands on an input element: its kernel offset (i*kw + j for rows and columns alike, in units of
// channels' strides) and the input row or column it reads at the phase's first output (m = 0).
struct Tap {
  int64_t index, source;
};

// The tap rows of output row oh that land on input rows: index i*kw, source row.
int64_t RowTaps(const Geometry& s, int64_t oh, Tap* taps) {
  int64_t count = 0;
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t p = oh * s.sh + i * s.dh - s.pt;  // Row of the dilated input.
    if (p < 0 || p % s.eh != 0 || p / s.eh >= s.h) continue;
    taps[count++] = {i * s.kw, p / s.eh};
  }
  return count;
}

// One phase of output columns, ow = q + ew*m for m in [0, count): the tap columns that land on input columns
// (index j, source column at m = 0; at m, source + m*sw) and the m whose every tap is inside the input.
struct Phase {
  int64_t q, count, inner_lo, inner_hi, taps;
  Tap tap[64];  // kw <= 64: native.depthwise_forward checks.
};

Phase MakePhase(const Geometry& s, int64_t q) {
  Phase ph{q, (s.wo - q + s.ew - 1) / s.ew, 0, 0, 0, {}};
  int64_t lo = 0, hi = ph.count;
  for (int64_t j = 0; j < s.kw; ++j) {
    const int64_t p = q + j * s.dw - s.pl;  // Column of the dilated input at m = 0 (sw is 1 when ew > 1).
    if (FloorDiv(p, s.ew) * s.ew != p) continue;
    const int64_t src = FloorDiv(p, s.ew);
    ph.tap[ph.taps++] = {j, src};
    // Inside for m*sw + src in [0, w).
    lo = std::max(lo, src >= 0 ? int64_t{0} : (-src + s.sw - 1) / s.sw);
    hi = std::min(hi, s.w - 1 - src < 0 ? int64_t{0} : (s.w - 1 - src) / s.sw + 1);
  }
  ph.inner_lo = std::min(lo, ph.count);
  ph.inner_hi = std::max(ph.inner_lo, hi);
  return ph;
}

// Outputs m in [m0, m0 + COLS) of one phase, channels [c0, c0 + T*W), every tap inside the input: COLS*T
// accumulators in registers, T kernel vectors loaded per tap.
template <int W, int T, int COLS>
inline void InteriorTile(const float* __restrict x_img, const float* __restrict k, float* __restrict y_row,
                         const Geometry& s, const Tap* rows, int64_t n_rows, const Phase& ph, int64_t m0,
                         int64_t c0) {
  Vec<W> acc[COLS][T];
  for (int t = 0; t < T; ++t) {
    const Vec<W> start = Start<W>(s, c0 + t * W);
    for (int o = 0; o < COLS; ++o) acc[o][t] = start;
  }
  const int64_t col_step = s.sw * s.c;
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* x_row = x_img + rows[r].source * s.w * s.c + c0;
    const float* k_row = k + rows[r].index * s.c + c0;
    for (int64_t t_ = 0; t_ < ph.taps; ++t_) {
      const Tap& tap = ph.tap[t_];
      Vec<W> kv[T];
      for (int t = 0; t < T; ++t) kv[t] = Load<W>(k_row + tap.index * s.c + t * W);
      const float* xv = x_row + (tap.source + m0 * s.sw) * s.c;
      for (int o = 0; o < COLS; ++o)
        for (int t = 0; t < T; ++t) acc[o][t] += Load<W>(xv + o * col_step + t * W) * kv[t];
    }
  }
  for (int o = 0; o < COLS; ++o)
    for (int t = 0; t < T; ++t) Store<W>(y_row + (ph.q + s.ew * (m0 + o)) * s.c + c0 + t * W, acc[o][t]);
}

// One output m of a phase near the left or right edge, channels [c0, c0 + T*W): taps outside skipped.
template <int W, int T>
inline void EdgeColumn(const float* __restrict x_img, const float* __restrict k, float* __restrict y_row,
                       const Geometry& s, const Tap* rows, int64_t n_rows, const Phase& ph, int64_t m, int64_t c0) {
  Vec<W> acc[T];
  for (int t = 0; t < T; ++t) acc[t] = Start<W>(s, c0 + t * W);
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* x_row = x_img + rows[r].source * s.w * s.c + c0;
    const float* k_row = k + rows[r].index * s.c + c0;
    for (int64_t t_ = 0; t_ < ph.taps; ++t_) {
      const int64_t col = ph.tap[t_].source + m * s.sw;
      if (col < 0 || col >= s.w) continue;
      for (int t = 0; t < T; ++t)
        acc[t] += Load<W>(x_row + col * s.c + t * W) * Load<W>(k_row + ph.tap[t_].index * s.c + t * W);
    }
  }
  for (int t = 0; t < T; ++t) Store<W>(y_row + (ph.q + s.ew * m) * s.c + c0 + t * W, acc[t]);
}

// Channels [c0, c0 + T*W) of one output row and phase: edge outputs one at a time, the interior in tiles.
template <int W, int T, int COLS>
void RowChannels(const float* x_img, const float* k, float* y_row, const Geometry& s, const Tap* rows,
                 int64_t n_rows, const Phase& ph, int64_t c0) {
  int64_t m = 0;
  for (; m < ph.inner_lo; ++m) EdgeColumn<W, T>(x_img, k, y_row, s, rows, n_rows, ph, m, c0);
  for (; m + COLS <= ph.inner_hi; m += COLS) InteriorTile<W, T, COLS>(x_img, k, y_row, s, rows, n_rows, ph, m, c0);
  for (; m < ph.inner_hi; ++m) InteriorTile<W, T, 1>(x_img, k, y_row, s, rows, n_rows, ph, m, c0);
  for (; m < ph.count; ++m) EdgeColumn<W, T>(x_img, k, y_row, s, rows, n_rows, ph, m, c0);
}

// Outputs m in [m0, m0 + COLS) of a stride-1 undilated phase (tap j reads the column after tap j - 1's),
// channels [c0, c0 + W): per tap row, the KW kernel vectors stay in registers and each of the COLS + KW - 1
// input vectors is loaded once and multiplied into every output it reaches. Tap by tap (InteriorTile) the
// same products load one input vector each: COLS * KW loads instead of COLS + KW - 1. kChecked skips the
// input columns outside the image (the padding), for tiles at the left and right edges.
template <int W, int KW, int COLS, bool kChecked>
inline void SlidingTile(const float* __restrict x_img, const float* __restrict k, float* __restrict y_row,
                        const Geometry& s, const Tap* rows, int64_t n_rows, const Phase& ph, int64_t m0,
                        int64_t c0) {
  Vec<W> acc[COLS];
  for (int o = 0; o < COLS; ++o) acc[o] = Start<W>(s, c0);
  const int64_t first = ph.tap[0].source + m0;  // The input column of tap 0 at output m0.
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* x = x_img + (rows[r].source * s.w + first) * s.c + c0;
    const float* k_row = k + rows[r].index * s.c + c0;
    Vec<W> kv[KW];
#pragma GCC unroll 8
    for (int j = 0; j < KW; ++j) kv[j] = Load<W>(k_row + j * s.c);
#pragma GCC unroll 32
    for (int p = 0; p < COLS + KW - 1; ++p) {
      if (kChecked && (first + p < 0 || first + p >= s.w)) continue;
      const Vec<W> v = Load<W>(x + p * s.c);
#pragma GCC unroll 8
      for (int j = 0; j < KW; ++j) {
        if (p - j >= 0 && p - j < COLS) acc[p - j] += v * kv[j];
      }
    }
  }
  for (int o = 0; o < COLS; ++o) Store<W>(y_row + (m0 + o) * s.c + c0, acc[o]);
}

template <int W, int KW, int COLS>
inline void Sliding(const float* x_img, const float* k, float* y_row, const Geometry& s, const Tap* rows,
                    int64_t n_rows, const Phase& ph, int64_t m0, int64_t c0) {
  if (m0 >= ph.inner_lo && m0 + COLS <= ph.inner_hi) {
    SlidingTile<W, KW, COLS, false>(x_img, k, y_row, s, rows, n_rows, ph, m0, c0);
  } else {
    SlidingTile<W, KW, COLS, true>(x_img, k, y_row, s, rows, n_rows, ph, m0, c0);
  }
}

// A whole stride-1 undilated row with KW tap columns, edges included, for the channels in whole W-float
// vectors (the rest is RowChannels'): SlidingTiles of 16, 8, 4 and 1 outputs, each for all of those channels
// before the next tile. ahead, when not null, is the input row the next output row reads first; each tile
// prefetches its columns.
template <int W, int KW>
void SlidingRow(const float* x_img, const float* k, float* y_row, const Geometry& s, const Tap* rows,
                int64_t n_rows, const Phase& ph, const float* ahead) {
  const auto tiles = [&](auto cols, int64_t m) {
    for (int64_t c0 = 0; c0 + W <= s.c; c0 += W) {
      Sliding<W, KW, cols.value>(x_img, k, y_row, s, rows, n_rows, ph, m, c0);
      if (ahead != nullptr) {
        for (int o = 0; o < cols.value; ++o) __builtin_prefetch(ahead + (m + o) * s.c + c0);
      }
    }
  };
  // A 3-wide kernel's edge outputs (one per side) go one at a time, so that the tiles between never check
  // for padding (a checked 16-column tile spent as long as two unchecked ones); wider kernels have several
  // edge outputs per side, and a single-column tile reloads all KW kernel vectors for each.
  const int64_t lo = KW <= 3 ? ph.inner_lo : 0, hi = KW <= 3 ? ph.inner_hi : ph.count;
  int64_t m = 0;
  for (; m < lo; ++m) tiles(std::integral_constant<int, 1>{}, m);
  for (; m + 16 <= hi; m += 16) tiles(std::integral_constant<int, 16>{}, m);
  for (; m + 8 <= hi; m += 8) tiles(std::integral_constant<int, 8>{}, m);
  for (; m + 4 <= hi; m += 4) tiles(std::integral_constant<int, 4>{}, m);
  for (; m < ph.count; ++m) tiles(std::integral_constant<int, 1>{}, m);
}

using RowKernel = void (*)(const float*, const float*, float*, const Geometry&, const Tap*, int64_t, const Phase&,
                           const float*);

// The sliding kernel for this geometry, or nullptr where it does not apply: strides, dilations and input
// dilations of 1 along the width and a kernel 3, 5 or 7 wide; it computes the channels in 16-float vectors.
// ConvNeXt-Tiny's 7x7 forward and input gradient took 34 ms per step against 50 tap by tap; MobileNetV2's
// 3x3 forward at 14x14x576, batch 32, 1.8-2.0 ms against 5.1-5.3 (its single-column edge tiles were much of
// the row). Only with AVX-512's 32 registers, which hold a tile's accumulators and kernel vectors.
RowKernel SlidingKernel(const Geometry& s) {
#if defined(__AVX512F__)
  if (s.sw == 1 && s.dw == 1 && s.ew == 1) {
    if (s.kw == 7) return SlidingRow<16, 7>;
    if (s.kw == 5) return SlidingRow<16, 5>;
    if (s.kw == 3) return SlidingRow<16, 3>;
  }
#endif
  return nullptr;
}

// BatchNorm's backward sums through the clamp after it (ClampedSums in channel_sums.cc) over the rows this
// kernel writes, when they are the clamp's cotangent: an input gradient of a depthwise convolution whose
// input was clamp(BatchNorm(bn_input)). Each row is summed while it is in cache, instead of read back.
struct ClampedRowSums {
  const float* bn_input;  // Shaped as the output.
  medjax::Normalization norm;
  double* sg;   // C doubles: sum of the masked cotangent, added into.
  double* sgx;  // C doubles: sum of the masked cotangent times bn_input.
};

// Adds one output row's clamped sums (its wo columns) into sums, in float over the row, then in double.
// Column by column it prefetches the same column of next_row (the BatchNorm input of the row after, or
// nullptr), which the next call reads after the convolution of its row: left to the hardware, those reads
// started only then (MobileNetV2's input gradients with these sums took 1.19x as long, interleaved).
void AddClampedRow(const float* __restrict g_row, const float* __restrict x_row, const float* next_row,
                   int64_t wo, int64_t c, const ClampedRowSums& sums, float* __restrict row_g,
                   float* __restrict row_gx) {
  const medjax::Normalization norm = sums.norm;  // A local copy: its fields stay in registers.
  std::fill(row_g, row_g + c, 0.0f);
  std::fill(row_gx, row_gx + c, 0.0f);
  for (int64_t w = 0; w < wo; ++w, g_row += c, x_row += c) {
    if (next_row != nullptr) {
      for (int64_t k = 0; k < c; k += 64 / sizeof(float)) __builtin_prefetch(next_row + w * c + k, 0, 2);
    }
    for (int64_t k = 0; k < c; ++k) {
      const float gm = norm.Masked(g_row[k], x_row[k], k);
      row_g[k] += gm;
      row_gx[k] += gm * x_row[k];
    }
  }
  for (int64_t k = 0; k < c; ++k) {
    sums.sg[k] += row_g[k];
    sums.sgx[k] += row_gx[k];
  }
}

// Output rows [r0, r1) of the flattened (n, oh) index, all channels: pairs of 16-float vectors (8 columns x 2
// vectors = 16 accumulators of the 32 AVX-512 registers), then single vectors of 16, 8 and 1 floats. With a
// normalization, the tap rows are read from its cache (the kernels address rows as image + source * W * C,
// so the image becomes the cache and the source the slot). With sums, each finished row is added to them.
void ForwardRows(const float* x, const float* k, float* y, const Geometry& s, const medjax::Normalization* norm,
                 const ClampedRowSums* sums, int64_t r0, int64_t r1) {
  std::vector<float> row_sums(sums != nullptr ? 2 * s.c : 0);
  std::vector<float> row_buffer(s.stream ? s.wo * s.c : 0);
  std::vector<Phase> phases;
  for (int64_t q = 0; q < std::min(s.ew, s.wo); ++q) phases.push_back(MakePhase(s, q));
  std::vector<Tap> rows(s.kh);
  const RowKernel sliding = SlidingKernel(s);
  std::optional<medjax::NormalizedRows> normalized;
  if (norm != nullptr) normalized.emplace(x, s.h, s.w, s.c, *norm, s.kh, 0, s.c);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / s.ho, oh = r % s.ho;
    const float* x_img = x + n * s.h * s.w * s.c;
    float* y_row = s.stream ? row_buffer.data() : y + r * s.wo * s.c;
    const int64_t n_rows = RowTaps(s, oh, rows.data());
    if (normalized) {
      for (int64_t i = 0; i < n_rows; ++i) rows[i].source = normalized->Slot(n, rows[i].source);
      x_img = normalized->data();
    }
    // The input row the next output row reads first: its last tap row, one stride down (not from the
    // normalized cache, which holds only the rows in use).
    const bool has_ahead = !normalized && n_rows > 0 && rows[n_rows - 1].source + s.sh < s.h;
    const float* ahead = has_ahead ? x_img + (rows[n_rows - 1].source + s.sh) * s.w * s.c : nullptr;
    for (const Phase& ph : phases) {
      int64_t c0 = 0;
      if (sliding != nullptr) {
        sliding(x_img, k, y_row, s, rows.data(), n_rows, ph, ahead);
        c0 = s.c / 16 * 16;
      }
      for (; c0 + 32 <= s.c; c0 += 32) RowChannels<16, 2, 8>(x_img, k, y_row, s, rows.data(), n_rows, ph, c0);
      for (; c0 + 16 <= s.c; c0 += 16) RowChannels<16, 1, 8>(x_img, k, y_row, s, rows.data(), n_rows, ph, c0);
      for (; c0 + 8 <= s.c; c0 += 8) RowChannels<8, 1, 8>(x_img, k, y_row, s, rows.data(), n_rows, ph, c0);
      for (; c0 < s.c; ++c0) RowChannels<1, 1, 8>(x_img, k, y_row, s, rows.data(), n_rows, ph, c0);
    }
    if (sums != nullptr) {
      const float* bn_row = sums->bn_input + r * s.wo * s.c;
      const float* next_row = r + 1 < s.n * s.ho ? bn_row + s.wo * s.c : nullptr;
      AddClampedRow(y_row, bn_row, next_row, s.wo, s.c, *sums, row_sums.data(), row_sums.data() + s.c);
    }
    if (s.stream) medjax::StreamCopy(y_row, y + r * s.wo * s.c, s.wo * s.c);
  }
  if (s.stream) medjax::StreamFence();
}

// Output rows in contiguous chunks, one per thread: (tasks, rows per task).
std::pair<int64_t, int64_t> Chunks(ffi::ThreadPool& pool, const Geometry& s) {
  const int64_t rows = s.n * s.ho;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(1, (rows + threads - 1) / threads);
  return {(rows + chunk - 1) / chunk, chunk};
}

ffi::Future Run(ffi::ThreadPool& pool, const float* x_data, const float* k_data, float* y_data, const Geometry& s,
                std::optional<medjax::Normalization> norm) {
  if (s.wo == 0 || s.c == 0) return medjax::RunTasks(pool, 0, [](int64_t) {});
  const auto [tasks, chunk] = Chunks(pool, s);
  const int64_t rows = s.n * s.ho;
  return medjax::RunTasks(pool, tasks, [=](int64_t t) {
    ForwardRows(x_data, k_data, y_data, s, norm ? &*norm : nullptr, nullptr, t * chunk,
                std::min(rows, (t + 1) * chunk));
  });
}

Geometry MakeGeometry(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& k,
                      ffi::ResultBuffer<ffi::F32>& y, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt,
                      int64_t pl, int64_t eh, int64_t ew, const float* bias, int64_t stream) {
  auto xd = x.dimensions();
  auto kd = k.dimensions();
  auto yd = y->dimensions();
  return Geometry{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], kd[0], kd[1], sh, sw, dh, dw, pt, pl, eh, ew, bias,
                  stream != 0};
}

ffi::Future Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                    ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt,
                    int64_t pl, int64_t eh, int64_t ew, int64_t stream) {
  const Geometry s = MakeGeometry(x, k, y, sh, sw, dh, dw, pt, pl, eh, ew, nullptr, stream);
  return Run(pool, x.typed_data(), k.typed_data(), y->typed_data(), s, std::nullopt);
}

// The forward pass with the layer's bias as the sums' starting value: no pass of its own to add it.
ffi::Future ForwardWithBias(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                            int64_t dh, int64_t dw, int64_t pt, int64_t pl, int64_t stream) {
  const Geometry s = MakeGeometry(x, k, y, sh, sw, dh, dw, pt, pl, 1, 1, bias.typed_data(), stream);
  return Run(pool, x.typed_data(), k.typed_data(), y->typed_data(), s, std::nullopt);
}

// The forward pass of a depthwise convolution whose input is clamp(BatchNorm(x)) (normalized_rows.h), from x.
// Undilated kernels without input dilation only (NormalizedRows' slots).
ffi::Future NormalizedForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                              ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> k,
                              ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                              float lo, float hi, int64_t stream) {
  const Geometry s = MakeGeometry(x, k, y, sh, sw, 1, 1, pt, pl, 1, 1, nullptr, stream);
  const medjax::Normalization norm{mean.typed_data(), mul.typed_data(), bias.typed_data(), lo, hi};
  return Run(pool, x.typed_data(), k.typed_data(), y->typed_data(), s, norm);
}

// The forward kernel as an input gradient (the cotangent x, dilated by the stride, and the flipped kernel),
// with the clamped BatchNorm sums of what it writes: each task sums its rows into its own doubles, and the
// last to finish adds the tasks' sums in task order, so the result does not depend on scheduling.
ffi::Future InputGradClampedSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                                 ffi::Buffer<ffi::F32> bn_input, ffi::Buffer<ffi::F32> mean,
                                 ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias,
                                 ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> sg,
                                 ffi::ResultBuffer<ffi::F32> sgx, int64_t pt, int64_t pl, int64_t eh, int64_t ew,
                                 float lo, float hi, int64_t stream) {
  const Geometry s = MakeGeometry(x, k, y, 1, 1, 1, 1, pt, pl, eh, ew, nullptr, stream);
  const auto [tasks, chunk] = Chunks(pool, s);
  const int64_t rows = s.n * s.ho;
  const float* x_data = x.typed_data();
  const float* k_data = k.typed_data();
  float* y_data = y->typed_data();
  const float* bn_data = bn_input.typed_data();
  const medjax::Normalization norm{mean.typed_data(), mul.typed_data(), bias.typed_data(), lo, hi};
  return medjax::RunTaskSums(pool, tasks, s.c, sg->typed_data(), sgx->typed_data(),
                             [=](int64_t t, double* s_g, double* s_gx) {
                               const ClampedRowSums sums{bn_data, norm, s_g, s_gx};
                               ForwardRows(x_data, k_data, y_data, s, nullptr, &sums, t * chunk,
                                           std::min(rows, (t + 1) * chunk));
                             });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxDepthwiseForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("eh")
                                  .Attr<int64_t>("ew")
                                  .Attr<int64_t>("stream"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxNormalizedDepthwiseForward, NormalizedForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<float>("lo")
                                  .Attr<float>("hi")
                                  .Attr<int64_t>("stream"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxDepthwiseForwardWithBias, ForwardWithBias,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("stream"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxDepthwiseInputGradClampedSums, InputGradClampedSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("eh")
                                  .Attr<int64_t>("ew")
                                  .Attr<float>("lo")
                                  .Attr<float>("hi")
                                  .Attr<int64_t>("stream"));
