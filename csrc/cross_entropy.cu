// Vocab-parallel cross-entropy on logits[rows, v], this rank's slice of the vocabulary starting at
// vocab_start, one block per row.
//   forward:  stats[row] = {m, s, t}: m = max_j x_j, s = sum_j exp(x_j - m), t = x[target - start]
//             when the target is in this slice, else 0. The ranks combine their stats into
//             lse = M + log(sum_r s_r exp(m_r - M)) and loss = lse - sum_r t_r (in Python).
//   backward: dx_j = (exp(x_j - lse) - [j == target - start]) * dloss[row]
// The forward reads the logits once (an online max/sum), the backward reads and writes them once;
// nothing of size rows x v is kept beyond the logits themselves.
#include <cub/block/block_reduce.cuh>

#include <cmath>
#include <initializer_list>
#include <type_traits>

#include "common.cuh"

namespace melama {
namespace {

constexpr int kBlock = 256;

// Running softmax denominator: sum of exp(x - m) over the elements seen, with their max m.
struct MaxSum {
  float m, s;
};

// Combine two partial (m, s); an empty side has m = -inf and s = 0.
__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

struct Combine {
  __device__ __forceinline__ MaxSum operator()(MaxSum a, MaxSum b) const { return combine(a, b); }
};

using Reduce = cub::BlockReduce<MaxSum, kBlock>;

template <typename T, int N>
__global__ void __launch_bounds__(kBlock)
    xent_fwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                    float* __restrict__ stats, int64_t v, int64_t vocab_start) {
  __shared__ Reduce::TempStorage tmp;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * v;

  MaxSum acc{-INFINITY, 0.f};
  for (int64_t c = threadIdx.x * N; c < v; c += kBlock * N) {
    float xv[N];
    load<T, N>(x + c, xv);
    float m = acc.m;
#pragma unroll
    for (int i = 0; i < N; ++i) m = fmaxf(m, xv[i]);
    if (m == -INFINITY) continue;  // all -inf so far: nothing to add
    float s = acc.s * __expf(acc.m - m);
#pragma unroll
    for (int i = 0; i < N; ++i) s += __expf(xv[i] - m);
    acc = {m, s};
  }
  const MaxSum total = Reduce(tmp).Reduce(acc, Combine());
  if (threadIdx.x == 0) {
    const int64_t t = target[row] - vocab_start;
    float* out = stats + 3 * row;
    out[0] = total.m;
    out[1] = total.s;
    out[2] = (t >= 0 && t < v) ? to_float(x[t]) : 0.f;
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kBlock)
    xent_bwd_kernel(const T* logits, const int64_t* __restrict__ target,
                    const float* __restrict__ lse, const float* __restrict__ dloss,
                    T* dx, int64_t v, int64_t vocab_start) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * v;
  T* d = dx + row * v;
  const float l = lse[row], g = dloss[row];
  const int64_t t = target[row] - vocab_start;
  for (int64_t c = threadIdx.x * N; c < v; c += kBlock * N) {
    float xv[N];
    load<T, N>(x + c, xv);
#pragma unroll
    for (int i = 0; i < N; ++i) xv[i] = (__expf(xv[i] - l) - (c + i == t ? 1.f : 0.f)) * g;
    store<T, N>(d + c, xv);
  }
}

// One block per row: checks the sizes, then calls launch(Tag<T>, N) with N the vector width when
// v and every pointer in `ptrs` allow it, else 1.
template <typename Launch>
cudaError_t launch_per_row(int64_t rows, int64_t v, int dtype,
                           std::initializer_list<const void*> ptrs, Launch&& launch) {
  if (rows < 0 || rows > INT32_MAX || v <= 0) return cudaErrorInvalidValue;  // rows: gridDim.x
  if (rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int n = kVec<T>;
    bool vec = v % n == 0;
    for (const void* p : ptrs) vec = vec && aligned(p, sizeof(T) * n);
    if (vec) launch(tag, std::integral_constant<int, n>{});
    else launch(tag, std::integral_constant<int, 1>{});
    return launched();
  });
}

}  // namespace
}  // namespace melama

extern "C" int melama_xent_fwd(const void* logits, const int64_t* target, float* stats,
                               int64_t rows, int64_t v, int64_t vocab_start, int dtype,
                               cudaStream_t stream) {
  return melama::launch_per_row(rows, v, dtype, {logits}, [&](auto tag, auto n) {
    using T = typename decltype(tag)::type;
    melama::xent_fwd_kernel<T, n.value><<<static_cast<unsigned>(rows), melama::kBlock, 0, stream>>>(
        static_cast<const T*>(logits), target, stats, v, vocab_start);
  });
}

extern "C" int melama_xent_bwd(const void* logits, const int64_t* target, const float* lse,
                               const float* dloss, void* dx, int64_t rows, int64_t v,
                               int64_t vocab_start, int dtype, cudaStream_t stream) {
  return melama::launch_per_row(rows, v, dtype, {logits, dx}, [&](auto tag, auto n) {
    using T = typename decltype(tag)::type;
    melama::xent_bwd_kernel<T, n.value><<<static_cast<unsigned>(rows), melama::kBlock, 0, stream>>>(
        static_cast<const T*>(logits), target, lse, dloss, static_cast<T*>(dx), v, vocab_start);
  });
}
