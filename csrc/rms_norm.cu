// RMSNorm over the last dim: y = x * rsqrt(mean(x^2) + eps) * w, one block per row.
#include <cub/block/block_reduce.cuh>

#include "common.cuh"

namespace melama {
namespace {

constexpr int kBlock = 256;
constexpr int64_t kMaxCols = 16384;  // backward keeps a cols-float dw partial in shared memory
using Reduce = cub::BlockReduce<float, kBlock>;

// Sum of v over the block, returned to every thread. `tmp` may be reused right after.
__device__ __forceinline__ float block_sum(float v, Reduce::TempStorage& tmp, float& shared) {
  v = Reduce(tmp).Sum(v);
  if (threadIdx.x == 0) shared = v;
  __syncthreads();
  v = shared;
  __syncthreads();
  return v;
}

template <typename T, typename W, int N>
__global__ void __launch_bounds__(kBlock)
    rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ y,
                        float* __restrict__ rstd, int64_t cols, float eps) {
  __shared__ Reduce::TempStorage tmp;
  __shared__ float shared;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;

  float ss = 0.f;
  for (int64_t c = threadIdx.x * N; c < cols; c += kBlock * N) {
    float v[N];
    load<T, N>(xr + c, v);
#pragma unroll
    for (int i = 0; i < N; ++i) ss += v[i] * v[i];
  }
  const float r = rsqrtf(block_sum(ss, tmp, shared) / cols + eps);
  if (threadIdx.x == 0) rstd[row] = r;

  // Second read of the row is served from L1/L2.
  for (int64_t c = threadIdx.x * N; c < cols; c += kBlock * N) {
    float v[N], wv[N];
    load<T, N>(xr + c, v);
    load<W, N>(w + c, wv);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = v[i] * r * wv[i];
    store<T, N>(yr + c, v);
  }
}

// Each block takes rows blockIdx.x, blockIdx.x + gridDim.x, ... and writes its dw sum over them
// to partial[blockIdx.x]. A thread touches the same columns of s_dw in every loop, so s_dw needs
// no barriers.
template <typename T, typename W, int N>
__global__ void __launch_bounds__(kBlock)
    rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                        const W* __restrict__ w, const float* __restrict__ rstd,
                        T* __restrict__ dx, float* __restrict__ partial, int64_t rows,
                        int64_t cols) {
  extern __shared__ float s_dw[];
  __shared__ Reduce::TempStorage tmp;
  __shared__ float shared;
  for (int64_t c = threadIdx.x * N; c < cols; c += kBlock * N)
#pragma unroll
    for (int i = 0; i < N; ++i) s_dw[c + i] = 0.f;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;
    const T* dyr = dy + row * cols;
    const float r = rstd[row];
    float dot = 0.f;  // sum_j dy_j * w_j * x_j
    for (int64_t c = threadIdx.x * N; c < cols; c += kBlock * N) {
      float xv[N], gv[N], wv[N];
      load<T, N>(xr + c, xv);
      load<T, N>(dyr + c, gv);
      load<W, N>(w + c, wv);
#pragma unroll
      for (int i = 0; i < N; ++i) dot += gv[i] * wv[i] * xv[i];
    }
    // dx = r * w * dy - x * r^3 * dot / cols
    const float coef = block_sum(dot, tmp, shared) * r * r * r / cols;
    for (int64_t c = threadIdx.x * N; c < cols; c += kBlock * N) {
      float xv[N], gv[N], wv[N], out[N];
      load<T, N>(xr + c, xv);
      load<T, N>(dyr + c, gv);
      load<W, N>(w + c, wv);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        out[i] = r * wv[i] * gv[i] - coef * xv[i];
        s_dw[c + i] += gv[i] * xv[i] * r;
      }
      store<T, N>(dx + row * cols + c, out);
    }
  }
  for (int64_t c = threadIdx.x * N; c < cols; c += kBlock * N)
#pragma unroll
    for (int i = 0; i < N; ++i) partial[blockIdx.x * cols + c + i] = s_dw[c + i];
}

// dw[c] = sum over partials in a fixed order: kSlices threads per column stride over the
// partials, then thread 0 of the column adds the slices in order (deterministic).
constexpr int kCols = 32, kSlices = 8;

template <typename W>
__global__ void __launch_bounds__(kCols* kSlices)
    rms_norm_dw_kernel(const float* __restrict__ partial, W* __restrict__ dw, int64_t partials,
                       int64_t cols) {
  __shared__ float s[kSlices][kCols];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  float acc = 0.f;
  if (c < cols)
    for (int64_t p = threadIdx.y; p < partials; p += kSlices) acc += partial[p * cols + c];
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    for (int k = 1; k < kSlices; ++k) acc += s[k][threadIdx.x];
    dw[c] = from_float<W>(acc);
  }
}

// Calls f(Tag<T>, Tag<W>) for the (x, weight) storage types; weight is fp32 or x's dtype.
template <typename F>
cudaError_t dispatch_x_w(int dtype, int w_dtype, F&& f) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    if (w_dtype == MELAMA_F32) return f(t, Tag<float>{});
    if (w_dtype == dtype) return f(t, Tag<T>{});
    return cudaErrorInvalidValue;
  });
}

// Packs of kVec<T> when every pointer and the row length allow it, else scalars.
template <typename T, typename W>
bool vectorisable(int64_t cols, std::initializer_list<const void*> rows_ptrs, const void* w) {
  constexpr int n = kVec<T>;
  if (cols % n != 0 || !aligned(w, sizeof(W) * n)) return false;
  for (const void* p : rows_ptrs)
    if (!aligned(p, sizeof(T) * n)) return false;
  return true;
}

}  // namespace
}  // namespace melama

using namespace melama;

extern "C" int64_t melama_rms_norm_max_cols(void) { return kMaxCols; }

extern "C" int melama_rms_norm_fwd(const void* x, const void* w, void* y, float* rstd, int64_t rows,
                                   int64_t cols, float eps, int dtype, int w_dtype,
                                   cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || rows > INT32_MAX) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return dispatch_x_w(dtype, w_dtype, [&](auto t, auto wt) {
    using T = typename decltype(t)::type;
    using W = typename decltype(wt)::type;
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const W*>(w), static_cast<T*>(y), rstd, cols, eps);
    };
    if (vectorisable<T, W>(cols, {x, y}, w))
      launch(rms_norm_fwd_kernel<T, W, kVec<T>>);
    else
      launch(rms_norm_fwd_kernel<T, W, 1>);
    return launched();
  });
}

extern "C" int melama_rms_norm_bwd(const void* dy, const void* x, const void* w, const float* rstd,
                                   void* dx, void* dw, float* partial, int64_t partials,
                                   int64_t rows, int64_t cols, int dtype, int w_dtype,
                                   cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || cols > kMaxCols || partials < 1 || partials > INT32_MAX)
    return cudaErrorInvalidValue;
  return dispatch_x_w(dtype, w_dtype, [&](auto t, auto wt) {
    using T = typename decltype(t)::type;
    using W = typename decltype(wt)::type;
    const size_t smem = sizeof(float) * cols;
    auto run = [&](auto kernel) {
      // Above 48 KiB dynamic shared memory must be opted into per kernel.
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
      if (err != cudaSuccess) return err;
      kernel<<<static_cast<unsigned>(partials), kBlock, smem, stream>>>(
          static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const W*>(w), rstd,
          static_cast<T*>(dx), partial, rows, cols);
      return launched();
    };
    cudaError_t err = vectorisable<T, W>(cols, {dy, x, dx}, w)
                          ? run(rms_norm_bwd_kernel<T, W, kVec<T>>)
                          : run(rms_norm_bwd_kernel<T, W, 1>);
    if (err != cudaSuccess) return err;
    const unsigned grid = static_cast<unsigned>((cols + kCols - 1) / kCols);
    rms_norm_dw_kernel<W><<<grid, dim3(kCols, kSlices), 0, stream>>>(partial, static_cast<W*>(dw),
                                                                     partials, cols);
    return launched();
  });
}
