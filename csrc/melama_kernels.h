// C ABI of melama's CUDA kernels (no torch headers: the CPU build machines cannot compile them).
// Every launcher takes raw device pointers of contiguous tensors unless strides are given, sizes in
// elements, a dtype code and the stream to launch on, and returns a cudaError_t (0 = success).
// Arithmetic is fp32 whatever the storage dtype.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { MELAMA_F32 = 0, MELAMA_F16 = 1, MELAMA_BF16 = 2 };

const char* melama_error_string(int err);

// Largest hidden size the RMSNorm backward accepts (its dw partial lives in shared memory).
int64_t melama_rms_norm_max_cols(void);

// y = x * rstd * w per row of `cols`; rstd[rows] (fp32) is saved for the backward.
// w_dtype is MELAMA_F32 or equal to dtype.
int melama_rms_norm_fwd(const void* x, const void* w, void* y, float* rstd, int64_t rows,
                        int64_t cols, float eps, int dtype, int w_dtype, cudaStream_t stream);

// dx[rows, cols] and dw[cols]. `partial` is fp32 scratch of partials x cols: each of `partials`
// blocks sums dw over its rows there, then a second kernel sums the partials in a fixed order.
int melama_rms_norm_bwd(const void* dy, const void* x, const void* w, const float* rstd, void* dx,
                        void* dw, float* partial, int64_t partials, int64_t rows, int64_t cols,
                        int dtype, int w_dtype, cudaStream_t stream);

// x[rows, 2f] = [gate | up] -> y[rows, f] = silu(gate) * up.
int melama_swiglu_fwd(const void* x, void* y, int64_t rows, int64_t f, int dtype,
                      cudaStream_t stream);
// dx[rows, 2f] from dy[rows, f] and x.
int melama_swiglu_bwd(const void* dy, const void* x, void* dx, int64_t rows, int64_t f, int dtype,
                      cudaStream_t stream);

// Rotate-half RoPE on t[s, b, h, d] (element strides stride_s/b/h, last dim contiguous) with
// freqs[s, rot] fp32 angles; dims >= rot pass through. out is contiguous [s, b, h, d].
int melama_rotary_fwd(const void* t, const float* freqs, void* out, int64_t s, int64_t b,
                      int64_t h, int64_t d, int64_t rot, int64_t stride_s, int64_t stride_b,
                      int64_t stride_h, int dtype, cudaStream_t stream);
// The transpose rotation: dt from dy (same layout rules as the forward).
int melama_rotary_bwd(const void* dy, const float* freqs, void* dt, int64_t s, int64_t b,
                      int64_t h, int64_t d, int64_t rot, int64_t stride_s, int64_t stride_b,
                      int64_t stride_h, int dtype, cudaStream_t stream);

// Vocab-parallel cross-entropy on this rank's logits[rows, v] (vocabulary ids vocab_start ..
// vocab_start + v - 1), target[rows] int64 global ids. Forward: stats[rows, 3] fp32 = (max,
// sum of exp(x - max), the target's logit or 0 when it is not in this slice), which the ranks
// combine into lse[rows]. Backward: dx = (softmax(x) - onehot(target)) * dloss[rows], softmax
// taken with lse; dx may be the logits buffer itself.
int melama_xent_fwd(const void* logits, const int64_t* target, float* stats, int64_t rows,
                    int64_t v, int64_t vocab_start, int dtype, cudaStream_t stream);
int melama_xent_bwd(const void* logits, const int64_t* target, const float* lse,
                    const float* dloss, void* dx, int64_t rows, int64_t v, int64_t vocab_start,
                    int dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
