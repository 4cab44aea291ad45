// Fixed-width float vectors for medjax's native kernels, as GCC/Clang vector extensions: the compiler emits
// AVX-512 registers where the CPU has them (-march=native) and pairs or quads of narrower ones otherwise,
// so one source serves every x86-64 and ARM machine.
#pragma once

#include <cstdint>
#include <cstring>

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

}  // namespace medjax
