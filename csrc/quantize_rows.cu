// Per-row (per-token) symmetric quantization of activations, one pass:
//   scale[r] = max(max_k |x[r, k]| * (1 / HALF_RANGE), FLT_EPS)   (float32)
//   q[r, k]  = int8:  clamp(rint(x / scale), -128, 127)
//              fp8:   e4m3(clamp(x / scale, -448, 448))          (round to nearest even)
// HALF_RANGE is 127.5 (int8) or 448 (fp8), compressed-tensors' conventions.
// The scale is computed as a multiplication by the reciprocal, as PyTorch's CUDA
// division by a scalar does, so the torch reference twin on the same GPU gives
// the same bits. A row holding NaN / Inf gets a NaN / Inf scale (no device sync
// to check it), which carries into that row's output.
//
// One block per row; blockDim.x a multiple of 32 (<= 1024). x: [rows, K] row-major
// with row stride `ld` (elements); q: [rows, K] contiguous; scale: [rows].
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ float row_absmax(const T* row, int K) {
    __shared__ float partial[32];
    float m = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float v = fabsf(to_float(row[k]));
        m = (v != v || v > m) ? v : m;  // NaN wins, so it reaches the scale
    }
    for (int off = 16; off > 0; off >>= 1) {
        float o = __shfl_xor_sync(0xffffffffu, m, off);
        m = (o != o || o > m) ? o : m;
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) partial[warp] = m;
    __syncthreads();
    if (warp == 0) {
        int warps = blockDim.x >> 5;
        m = lane < warps ? partial[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) {
            float o = __shfl_xor_sync(0xffffffffu, m, off);
            m = (o != o || o > m) ? o : m;
        }
        if (lane == 0) partial[0] = m;
    }
    __syncthreads();
    return partial[0];
}

template <typename T>
__device__ void quantize_row_int8(const T* x, long ld, signed char* q, float* scale, int K) {
    const T* row = x + (long)blockIdx.x * ld;
    float s = row_absmax(row, K) * (1.0f / 127.5f);
    s = s < 1.1920928955078125e-07f ? 1.1920928955078125e-07f : s;  // NaN stays NaN (fmaxf would drop it)
    if (threadIdx.x == 0) scale[blockIdx.x] = s;
    signed char* out = q + (long)blockIdx.x * K;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float v = rintf(to_float(row[k]) / s);
        out[k] = (signed char)fminf(fmaxf(v, -128.0f), 127.0f);
    }
}

template <typename T>
__device__ void quantize_row_fp8(const T* x, long ld, __nv_fp8_e4m3* q, float* scale, int K) {
    const T* row = x + (long)blockIdx.x * ld;
    float s = row_absmax(row, K) * (1.0f / 448.0f);
    s = s < 1.1920928955078125e-07f ? 1.1920928955078125e-07f : s;  // NaN stays NaN (fmaxf would drop it)
    if (threadIdx.x == 0) scale[blockIdx.x] = s;
    __nv_fp8_e4m3* out = q + (long)blockIdx.x * K;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float v = fminf(fmaxf(to_float(row[k]) / s, -448.0f), 448.0f);
        out[k] = __nv_fp8_e4m3(v);
    }
}

#define QUANTIZE_ROWS(NAME, T)                                                                          \
    extern "C" __global__ void quantize_rows_int8_##NAME(const T* x, long ld, signed char* q, float* s, \
                                                          int K) {                                      \
        quantize_row_int8<T>(x, ld, q, s, K);                                                           \
    }                                                                                                   \
    extern "C" __global__ void quantize_rows_fp8_##NAME(const T* x, long ld, __nv_fp8_e4m3* q, float* s,\
                                                         int K) {                                       \
        quantize_row_fp8<T>(x, ld, q, s, K);                                                            \
    }

QUANTIZE_ROWS(f32, float)
QUANTIZE_ROWS(f16, __half)
QUANTIZE_ROWS(bf16, __nv_bfloat16)
