// The W8A8 int8 epilogue in one pass over the output:
//   out[m, n] = T( float(acc[m, n]) * sx[m] * sw[n] (+ float(bias[n])) )
// acc: int32 [M, N] (torch._int_mm's result, row stride lda elements), sx: float32 [M],
// sw: float32 [N], bias: float32 [N] or null (has_bias 0), out: T [M, N] contiguous.
// The operations and their order are those of the torch path (float32 products,
// round-to-nearest-even cast), so both give the same bits.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T>
__device__ void epilogue(const int* acc, long lda, const float* sx, const float* sw, const float* bias, int has_bias,
                         T* out, int M, int N) {
    long total = (long)M * N;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int m = (int)(i / N), n = (int)(i % N);
        // __fmul_rn / __fadd_rn: never contracted into an FMA, as torch's separate ops are not
        float v = __fmul_rn(__int2float_rn(acc[(long)m * lda + n]), sx[m]);
        v = __fmul_rn(v, sw[n]);
        if (has_bias) v = __fadd_rn(v, bias[n]);
        store(out + i, v);
    }
}

#define EPILOGUE(NAME, T)                                                                                     \
    extern "C" __global__ void scale_epilogue_##NAME(const int* acc, long lda, const float* sx, const float* sw, \
                                                      const float* bias, int has_bias, T* out, int M, int N) {   \
        epilogue<T>(acc, lda, sx, sw, bias, has_bias, out, M, N);                                             \
    }

EPILOGUE(f32, float)
EPILOGUE(f16, __half)
EPILOGUE(bf16, __nv_bfloat16)
