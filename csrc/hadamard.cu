// The online rotation of rotate-online checkpoints (quantkit.formats.hadamard.rotate_blocks):
// each row of x [rows, n] cut into n / b blocks of b = 2^k columns, each block times the
// Sylvester Hadamard matrix H_b / sqrt(b) (H_b[i][j] = (-1)^popcount(i & j), symmetric):
//
//     y[r, blk*b : (blk+1)*b] = x[r, blk*b : (blk+1)*b] @ H_b / sqrt(b)
//
// as a fast Walsh-Hadamard transform: log2(b) butterfly stages over the block held in shared
// memory (float32), b log2(b) additions instead of the twin's b^2 multiply-adds, one read of x
// and one write of y. The twin multiplies by the dense float32 matrix; the two agree to float32
// rounding (the sums are the same, in another order).
//
// One CUDA block per (column block, row), rows in a grid-stride loop over gridDim.y; blockDim.x
// a power of two <= b / 2 (each thread one butterfly pair per stage); shared memory b floats.
// x: [rows, n] with row stride ldx, unit column stride; y: [rows, n] with row stride ldy (may be x).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T>
__device__ void hadamard_blocks(const T* x, long ldx, T* y, long ldy, int rows, int b, float scale) {
    extern __shared__ float s[];
    const int t = threadIdx.x, threads = blockDim.x, half = b >> 1;
    const long col = (long)blockIdx.x * b;
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        const T* xr = x + row * ldx + col;
        T* yr = y + row * ldy + col;
        for (int i = t; i < b; i += threads) s[i] = to_float(xr[i]);
        __syncthreads();
        for (int h = 1; h < b; h <<= 1) {
            for (int p = t; p < half; p += threads) {
                const int j = ((p & ~(h - 1)) << 1) | (p & (h - 1));  // the pair (j, j + h)
                const float a = s[j], c = s[j + h];
                s[j] = a + c;
                s[j + h] = a - c;
            }
            __syncthreads();
        }
        for (int i = t; i < b; i += threads) store(yr + i, s[i] * scale);
        __syncthreads();  // the next row reuses s
    }
}

#define HADAMARD(NAME, T)                                                                              \
    extern "C" __global__ void hadamard_blocks_##NAME(const T* x, long ldx, T* y, long ldy, int rows, \
                                                       int b, float scale) {                           \
        hadamard_blocks<T>(x, ldx, y, ldy, rows, b, scale);                                            \
    }
HADAMARD(f32, float)
HADAMARD(f16, __half)
HADAMARD(bf16, __nv_bfloat16)
