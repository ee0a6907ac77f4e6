// Rotate-half rotary embedding (HF LLaMA / megatron rotary_interleaved=False) on sbhd tensors.
// For a pair (a, b) = (t[i], t[i + rot/2]):
//   forward:  out[i] = a cos(f_i) - b sin(f_i),  out[i + rot/2] = b cos(f_hi) + a sin(f_hi)
//   backward (the transpose): the sines swap places and change sign.
// The angles depend on the position only, so a thread computes sin/cos for its columns once and
// reuses them across the batch x heads rows of its position.
#include <algorithm>

#include "common.cuh"

namespace melama {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerThread = 4;
constexpr int kMaxRowThreads = 8;

struct Shape {
  int64_t s, b, h, d, rot;
  int64_t stride_s, stride_b, stride_h;  // of the input, in elements
  int64_t rows_per_block;                // of the b * h rows of one position
};

template <typename T, int N, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const T* __restrict__ in, const float* __restrict__ freqs, T* __restrict__ out,
                  Shape sh) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.z + threadIdx.z;
  if (pos >= sh.s) return;
  const int64_t half = sh.rot / 2;
  const int64_t pair_units = half / N;
  const int64_t units = pair_units + (sh.d - sh.rot) / N;
  const int64_t bh = sh.b * sh.h;
  const int64_t row_begin = blockIdx.y * sh.rows_per_block;
  const int64_t row_end = min(bh, row_begin + sh.rows_per_block);
  const float* f = freqs + pos * sh.rot;

  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
    const bool pair = u < pair_units;
    const int64_t c = pair ? u * N : sh.rot + (u - pair_units) * N;
    float cos_lo[N], cos_hi[N], sin_lo[N], sin_hi[N];
    if (pair) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float s_lo, s_hi;
        sincosf(f[c + k], &s_lo, &cos_lo[k]);
        sincosf(f[c + half + k], &s_hi, &cos_hi[k]);
        sin_lo[k] = kBackward ? -s_hi : s_lo;
        sin_hi[k] = kBackward ? -s_lo : s_hi;
      }
    }
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += blockDim.y) {
      const int64_t bi = row / sh.h, hi = row - bi * sh.h;
      const T* src = in + pos * sh.stride_s + bi * sh.stride_b + hi * sh.stride_h + c;
      T* dst = out + (pos * bh + row) * sh.d + c;
      float a[N];
      load<T, N>(src, a);
      if (pair) {
        float b[N], lo[N], hi_out[N];
        load<T, N>(src + half, b);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          lo[k] = a[k] * cos_lo[k] - b[k] * sin_lo[k];
          hi_out[k] = b[k] * cos_hi[k] + a[k] * sin_hi[k];
        }
        store<T, N>(dst, lo);
        store<T, N>(dst + half, hi_out);
      } else {
        store<T, N>(dst, a);  // pass-through dims
      }
    }
  }
}

template <bool kBackward>
cudaError_t launch(const void* in, const float* freqs, void* out, Shape sh, int dtype,
                   cudaStream_t stream) {
  if (sh.s < 0 || sh.b < 0 || sh.h < 0 || sh.rot <= 0 || sh.rot % 2 || sh.rot > sh.d)
    return cudaErrorInvalidValue;
  const int64_t bh = sh.b * sh.h;
  if (sh.s == 0 || bh == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int n = kVec<T>;
    const bool vec = multiples_of(n, {sh.rot / 2, sh.d, sh.stride_s, sh.stride_b, sh.stride_h}) &&
                     aligned(in, sizeof(T) * n) && aligned(out, sizeof(T) * n);
    const int64_t units = (sh.rot / 2 + sh.d - sh.rot) / (vec ? n : 1);
    // x: column units of a row, y: rows of one position, z: positions sharing the block. Few
    // threads in y give each thread ~kRowsPerThread rows to reuse its sin/cos on.
    const int64_t bx = std::min<int64_t>(units, kThreads);
    const int64_t by = std::clamp<int64_t>(bh / kRowsPerThread, 1,
                                           std::min<int64_t>(kMaxRowThreads, kThreads / bx));
    const int64_t bz = std::min<int64_t>({kThreads / (bx * by), sh.s, 64});  // 64: blockDim.z limit
    sh.rows_per_block = by * kRowsPerThread;
    // grid.y is limited to 65535: give each block more rows if needed
    const int64_t row_blocks = std::min<int64_t>((bh + sh.rows_per_block - 1) / sh.rows_per_block,
                                                 65535);
    sh.rows_per_block = (bh + row_blocks - 1) / row_blocks;
    const int64_t pos_blocks = (sh.s + bz - 1) / bz;
    if (pos_blocks > INT32_MAX) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(pos_blocks), static_cast<unsigned>(row_blocks));
    const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by),
                     static_cast<unsigned>(bz));
    auto kernel = vec ? rotary_kernel<T, n, kBackward> : rotary_kernel<T, 1, kBackward>;
    kernel<<<grid, block, 0, stream>>>(static_cast<const T*>(in), freqs, static_cast<T*>(out), sh);
    return launched();
  });
}

}  // namespace
}  // namespace melama

extern "C" int melama_rotary_fwd(const void* t, const float* freqs, void* out, int64_t s,
                                 int64_t b, int64_t h, int64_t d, int64_t rot, int64_t stride_s,
                                 int64_t stride_b, int64_t stride_h, int dtype,
                                 cudaStream_t stream) {
  return melama::launch<false>(t, freqs, out, {s, b, h, d, rot, stride_s, stride_b, stride_h, 0},
                               dtype, stream);
}

extern "C" int melama_rotary_bwd(const void* dy, const float* freqs, void* dt, int64_t s,
                                 int64_t b, int64_t h, int64_t d, int64_t rot, int64_t stride_s,
                                 int64_t stride_b, int64_t stride_h, int dtype,
                                 cudaStream_t stream) {
  return melama::launch<true>(dy, freqs, dt, {s, b, h, d, rot, stride_s, stride_b, stride_h, 0},
                              dtype, stream);
}
