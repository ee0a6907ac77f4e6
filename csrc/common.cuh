// Helpers shared by the kernels: dtype dispatch, fp32 conversion, aligned vector packs.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "melama_kernels.h"

namespace melama {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) for the storage type named by a MELAMA_* code.
template <typename F>
cudaError_t dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case MELAMA_F32: return f(Tag<float>{});
    case MELAMA_F16: return f(Tag<__half>{});
    case MELAMA_BF16: return f(Tag<__nv_bfloat16>{});
    default: return cudaErrorInvalidValue;
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive elements moved as one aligned load/store (N = 1 is the scalar fallback).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load(const T* p, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Elements of T in one 16-byte transaction.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

inline bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// True when every length/stride is a multiple of n.
inline bool multiples_of(int64_t n, std::initializer_list<int64_t> values) {
  for (int64_t v : values)
    if (v % n != 0) return false;
  return true;
}

// Grid for a grid-stride loop over `work` items with `block` threads.
inline unsigned grid_for(int64_t work, int block) {
  const int64_t blocks = (work + block - 1) / block;
  return static_cast<unsigned>(blocks < (1 << 20) ? (blocks > 0 ? blocks : 1) : (1 << 20));
}

// Launch errors surface here; execution errors surface at the caller's next synchronisation.
inline cudaError_t launched() { return cudaGetLastError(); }

}  // namespace melama
