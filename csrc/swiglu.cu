// SwiGLU on megatron's fused fc1 output: x[rows, 2f] = [gate | up] -> silu(gate) * up.
#include "common.cuh"

namespace melama {
namespace {

constexpr int kBlock = 256;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// One pack of N outputs per iteration; kBackward turns dy into dgate/dup instead.
template <typename T, int N, bool kBackward>
__global__ void __launch_bounds__(kBlock)
    swiglu_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                  int64_t rows, int64_t f) {
  const int64_t packs_per_row = f / N;
  const int64_t total = rows * packs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / packs_per_row;
    const int64_t c = (i - row * packs_per_row) * N;
    const T* gate_p = x + row * 2 * f + c;
    float gate[N], up[N];
    load<T, N>(gate_p, gate);
    load<T, N>(gate_p + f, up);
    if constexpr (kBackward) {
      float g[N];
      load<T, N>(dy + row * f + c, g);
      float dgate[N], dup[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float s = sigmoid(gate[k]);
        dup[k] = g[k] * gate[k] * s;                                // d/dup = silu(gate)
        dgate[k] = g[k] * up[k] * s * (1.f + gate[k] * (1.f - s));  // silu'(gate)
      }
      T* dx = out + row * 2 * f + c;
      store<T, N>(dx, dgate);
      store<T, N>(dx + f, dup);
    } else {
      float y[N];
#pragma unroll
      for (int k = 0; k < N; ++k) y[k] = gate[k] * sigmoid(gate[k]) * up[k];
      store<T, N>(out + row * f + c, y);
    }
  }
}

template <bool kBackward>
cudaError_t launch(const void* x, const void* dy, void* out, int64_t rows, int64_t f, int dtype,
                   cudaStream_t stream) {
  if (rows < 0 || f <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int n = kVec<T>;
    const bool vec = f % n == 0 && aligned(x, sizeof(T) * n) && aligned(out, sizeof(T) * n) &&
                     (!kBackward || aligned(dy, sizeof(T) * n));
    const int64_t packs = rows * (vec ? f / n : f);
    auto kernel = vec ? swiglu_kernel<T, n, kBackward> : swiglu_kernel<T, 1, kBackward>;
    kernel<<<grid_for(packs, kBlock), kBlock, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(out), rows, f);
    return launched();
  });
}

}  // namespace
}  // namespace melama

extern "C" int melama_swiglu_fwd(const void* x, void* y, int64_t rows, int64_t f, int dtype,
                                 cudaStream_t stream) {
  return melama::launch<false>(x, nullptr, y, rows, f, dtype, stream);
}

extern "C" int melama_swiglu_bwd(const void* dy, const void* x, void* dx, int64_t rows, int64_t f,
                                 int dtype, cudaStream_t stream) {
  return melama::launch<true>(x, dy, dx, rows, f, dtype, stream);
}
