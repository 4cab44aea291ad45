// Fixed-width float vectors for medjax's native kernels, as GCC/Clang vector extensions: the compiler emits
// AVX-512 registers where the CPU has them (-march=native) and pairs or quads of narrower ones otherwise,
// so one source serves every x86-64 and ARM machine.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace medjax {

// W floats as one vector (W = 1 is a scalar in vector clothing, so edge code shares the templates).
template <int W>
struct VecOf {
  typedef float type __attribute__((vector_size(W * sizeof(float))));
};
template <int W>
using Vec = typename VecOf<W>::type;

// W int32s, the lane type of a Vec<W> comparison and of exponent-bit arithmetic.
template <int W>
struct IntVecOf {
  typedef int32_t type __attribute__((vector_size(W * sizeof(int32_t))));
};

// Unaligned load and store; each compiles to one vector move.
template <int W>
inline Vec<W> Load(const float* p) {
  Vec<W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
inline void Store(float* p, const Vec<W>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Copies n floats to dst with non-temporal (streaming) stores, which write whole cache lines to memory
// without first reading them in; the part of dst not aligned for them is copied as usual. Why: a kernel
// whose output is larger than the last-level cache spends much of its time on those reads (a store to a
// line not in cache reads the line first); streaming MobileNetV2's widest depthwise input gradient from a
// row buffer took 1.4x less time. Call StreamFence before another thread may read dst.
inline void StreamCopy(const float* __restrict src, float* __restrict dst, int64_t n) {
#if defined(__AVX512F__)
  constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
  constexpr int64_t kLanes = 8;
#else
  constexpr int64_t kLanes = 1;
#endif
  const int64_t misaligned = (reinterpret_cast<uintptr_t>(dst) / sizeof(float)) % kLanes;
  int64_t i = std::min(n, misaligned == 0 ? int64_t{0} : kLanes - misaligned);
  std::copy(src, src + i, dst);
#if defined(__AVX512F__)
  for (; i + kLanes <= n; i += kLanes) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__AVX__)
  for (; i + kLanes <= n; i += kLanes) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
  std::copy(src + i, src + n, dst + i);
}

// Orders this thread's streaming stores before its later stores (such as the signal that its task is done).
inline void StreamFence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace medjax
