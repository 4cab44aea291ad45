// Input rows of a depthwise convolution that follows a training-mode BatchNorm and a clamp (ReLU, ReLU6), for
// the kernels that fuse the two (depthwise_forward.cc, depthwise_kernel_grad.cc):
//
//   a[n, h, w, c] = clamp((x[n, h, w, c] - mean[c]) * mul[c] + bias[c], lo, hi)
//
// computed from the BatchNorm's input x a row at a time into a small per-task cache, where the convolution
// reads it. Why: unfused, XLA writes the whole of a (in MobileNetV2 the widest maps, 32x112x112x96 at 224)
// and the convolution reads it back, and the backward pass keeps it; a row of it here stays in the cache
// between the few output rows that read it. ClampedSums (channel_sums.cc) and the input gradient's sums
// (depthwise_forward.cc) take their mask from the same Normalization::Affine, so the backward pass's mask
// agrees with the values used here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace medjax {

// A BatchNorm's per-channel affine map and the clamp after it.
struct Normalization {
  const float* mean;
  const float* mul;
  const float* bias;
  float lo, hi;

  // The BatchNorm's output for input x at channel k.
  float Affine(float x, int64_t k) const { return (x - mean[k]) * mul[k] + bias[k]; }
  // The clamp's input gradient: g where the BatchNorm's output for x lies strictly inside (lo, hi), else 0.
  float Masked(float g, float x, int64_t k) const {
    const float z = Affine(x, k);
    return (z > lo && z < hi) ? g : 0.0f;
  }
};

// Normalized rows of an (N, H, W, C) input, channels [c0, c1), kept in `slots` row buffers laid out like the
// input's rows (stride C per column, so the kernels index them as they index x). A row's slot is its index
// modulo `slots`. With `slots` = the kernel height and an undilated kernel, the rows one output row reads
// are consecutive, so they never share a slot, and the next output row finds the rows it shares still there;
// a dilated kernel's rows could evict each other, so the handlers refuse dilation.
class NormalizedRows {
 public:
  NormalizedRows(const float* x, int64_t h, int64_t w, int64_t c, const Normalization& norm, int64_t slots,
                 int64_t c0, int64_t c1)
      : x_(x), h_(h), w_(w), c_(c), c0_(c0), c1_(c1), norm_(norm), slots_(slots),
        data_(slots * w * c), keys_(slots, -1) {}

  // The buffer holding every slot: slot s's row starts at data() + s * W * C.
  const float* data() const { return data_.data(); }

  // The slot holding input row `row` of image `n`, normalizing it there first unless it is already.
  int64_t Slot(int64_t n, int64_t row) {
    const int64_t key = n * h_ + row, slot = row % slots_;
    if (keys_[slot] != key) {
      Normalize(x_ + key * w_ * c_, data_.data() + slot * w_ * c_);
      keys_[slot] = key;
    }
    return slot;
  }

 private:
  void Normalize(const float* __restrict src, float* __restrict dst) const {
    for (int64_t col = 0; col < w_; ++col, src += c_, dst += c_) {
      // min(max(.)) keeps a NaN (a diverged run must still show one), as XLA's clamp does.
      for (int64_t k = c0_; k < c1_; ++k) dst[k] = std::min(std::max(norm_.Affine(src[k], k), norm_.lo), norm_.hi);
    }
  }

  const float* x_;
  int64_t h_, w_, c_, c0_, c1_;
  Normalization norm_;
  int64_t slots_;
  std::vector<float> data_;
  std::vector<int64_t> keys_;
};

}  // namespace medjax
