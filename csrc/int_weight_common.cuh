// Device helpers shared by csrc/int_weight_mma.cu and csrc/int_weight_wgmma.cu: the dequantizer
// (magic-number conversion of packed fields, Unit), the mma.sync wrapper, programmatic dependent
// launch, cp.async. quantkit.kernels.cuda.source() pastes this file in place of its #include line (once).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned int u32;

template <typename T> struct Pair;
template <> struct Pair<__half> { typedef __half2 type; };
template <> struct Pair<__nv_bfloat16> { typedef __nv_bfloat162 type; };

// (w & mask) | magic in one LOP3 (C++ & and | with two immediates compile to two).
template <u32 MASK, u32 MAGIC>
__device__ __forceinline__ u32 and_or(u32 w) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(w), "n"(MASK), "n"(MAGIC));
    return r;
}

// (BASE + u) as a pair of T from the masked bits: the "magic number" conversion
// for fp16 (1024 + u, exact for u < 1024) and 4-bit bf16 (128 + u); 8-bit bf16
// (128 + u would not be exact) builds 2^23 + u in float32 instead.
template <typename T, int BITS> struct Magic;
template <int BITS> struct Magic<__half, BITS> {
    static constexpr float base = 1024.0f;
    template <u32 MASK> __device__ static __forceinline__ u32 pair(u32 w) { return and_or<MASK, 0x64006400u>(w); }
};
template <> struct Magic<__nv_bfloat16, 4> {
    static constexpr float base = 128.0f;
    template <u32 MASK> __device__ static __forceinline__ u32 pair(u32 w) { return and_or<MASK, 0x43004300u>(w); }
};
template <> struct Magic<__nv_bfloat16, 8> {
    static constexpr float base = 0.0f;
    template <u32 MASK> __device__ static __forceinline__ u32 pair(u32 w) {  // MASK is 0x00ff00ff
        const float lo = __uint_as_float(0x4b000000u | (w & 0xffu)) - 8388608.0f;
        const float hi = __uint_as_float(0x4b000000u | ((w >> 16) & 0xffu)) - 8388608.0f;
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // exact: integers below 256
        return *reinterpret_cast<u32*>(&v);
    }
};

template <typename T>
__device__ __forceinline__ typename Pair<T>::type as_pair(u32 v) { return *reinterpret_cast<typename Pair<T>::type*>(&v); }
template <typename T>
__device__ __forceinline__ u32 as_u32(typename Pair<T>::type v) { return *reinterpret_cast<u32*>(&v); }

// The A registers of one unit, a[rt][h][r], as (q - z) (SCALE = false: exact
// integers) or (q - z) * s rounded once (SCALE = true). z[i], s[i]: row g + 8 i.
template <typename T, int BITS, bool SCALE> struct Unit {
    typedef typename Pair<T>::type T2;
    __device__ static __forceinline__ u32 finish(u32 v, T2 z, T2 s) {
        T2 r = __hsub2(as_pair<T>(v), z);
        if (SCALE) r = __hmul2(r, s);
        return as_u32<T>(r);
    }
    __device__ static __forceinline__ void dequant(const uint4* q, u32 a[2][2][4], const T2 z[4], const T2 s[4]) {
#pragma unroll
        for (int rt = 0; rt < 2; ++rt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const T2 z0 = z[2 * rt], z1 = z[2 * rt + 1], s0 = s[2 * rt], s1 = s[2 * rt + 1];
                if (BITS == 4) {
                    const u32 w = reinterpret_cast<const u32*>(q)[rt * 2 + h];
                    typedef Magic<T, BITS> C;
                    a[rt][h][0] = finish(C::template pair<0x000f000fu>(w), z0, s0);
                    a[rt][h][1] = finish(C::template pair<0x000f000fu>(w >> 4), z1, s1);
                    a[rt][h][2] = finish(C::template pair<0x000f000fu>(w >> 8), z0, s0);
                    a[rt][h][3] = finish(C::template pair<0x000f000fu>(w >> 12), z1, s1);
                } else {
                    const u32* w = reinterpret_cast<const u32*>(&q[rt]) + h * 2;
                    typedef Magic<T, BITS> C;
                    a[rt][h][0] = finish(C::template pair<0x00ff00ffu>(w[0]), z0, s0);
                    a[rt][h][1] = finish(C::template pair<0x00ff00ffu>(w[0] >> 8), z1, s1);
                    a[rt][h][2] = finish(C::template pair<0x00ff00ffu>(w[1]), z0, s0);
                    a[rt][h][3] = finish(C::template pair<0x00ff00ffu>(w[1] >> 8), z1, s1);
                }
            }
    }
};

// fp16 4-bit: the odd nibbles are converted in place (1024 + 16 u, Marlin's trick)
// and brought down by one fma, exact: (1024 + 16 u) / 16 - (64 + u_z) = u - u_z.
template <bool SCALE> struct Unit<__half, 4, SCALE> {
    __device__ static __forceinline__ void dequant(const uint4* q, u32 a[2][2][4], const __half2 z[4], const __half2 s[4]) {
        const __half2 sixteenth = __float2half2_rn(0.0625f), k960 = __float2half2_rn(960.0f);
#pragma unroll
        for (int rt = 0; rt < 2; ++rt) {
            const __half2 z0 = z[2 * rt], nz1 = __hsub2(k960, z[2 * rt + 1]);  // -(64 + u_z)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 w = reinterpret_cast<const u32*>(q)[rt * 2 + h];
#pragma unroll
                for (int hc = 0; hc < 2; ++hc) {
                    const u32 v = w >> (8 * hc);
                    __half2 lo = __hsub2(as_pair<__half>(and_or<0x000f000fu, 0x64006400u>(v)), z0);
                    __half2 hi = __hfma2(as_pair<__half>(and_or<0x00f000f0u, 0x64006400u>(v)), sixteenth, nz1);
                    if (SCALE) {
                        lo = __hmul2(lo, s[2 * rt]);
                        hi = __hmul2(hi, s[2 * rt + 1]);
                    }
                    a[rt][h][2 * hc] = as_u32<__half>(lo);
                    a[rt][h][2 * hc + 1] = as_u32<__half>(hi);
                }
            }
        }
    }
};

template <typename T> __device__ __forceinline__ void mma(float c[4], const u32 a[4], u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma<__half>(float c[4], const u32 a[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float c[4], const u32 a[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (quantkit.kernels.cuda.launch(dependent=True)): the kernel may
// start before the previous one on the stream has finished. pdl_wait() blocks until that one has
// completed and its writes are visible; nothing that an earlier kernel writes may be read, and
// nothing written, before it. pdl_trigger() lets the next kernel launch now (it waits itself).
// Both are no-ops in a kernel launched the ordinary way.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Weights are read once: keep them out of L1 (x and the scales live there).
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

template <typename T>
__device__ __forceinline__ typename Pair<T>::type splat(T v) {
    typename Pair<T>::type r;
    r.x = v;
    r.y = v;
    return r;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <int NT> __device__ __forceinline__ void zero_tiles(float c[2][NT][4]) {
#pragma unroll
    for (int rt = 0; rt < 2; ++rt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) c[rt][nt][i] = 0.0f;
}

// One unit's four A tiles times one token tile's x chunk (B fragments of both column
// halves): c0 += rows 0-15, c1 += rows 16-31.
template <typename T>
__device__ __forceinline__ void mma_unit(float c0[4], float c1[4], const u32 a[2][2][4], uint4 xv) {
    mma<T>(c0, a[0][0], xv.x, xv.y);
    mma<T>(c0, a[0][1], xv.z, xv.w);
    mma<T>(c1, a[1][0], xv.x, xv.y);
    mma<T>(c1, a[1][1], xv.z, xv.w);
}

// A lane's four scale (and zero) entries, rows g + 8 i, as pairs for the dequantizer.
template <typename T, bool ASYM>
__device__ __forceinline__ void lane_pairs(const T* s4, const T* z4, T sym_zero, typename Pair<T>::type s2[4],
                                           typename Pair<T>::type z2[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        s2[i] = splat<T>(s4[i]);
        z2[i] = splat<T>(ASYM ? z4[i] : sym_zero);
    }
}

constexpr int WARPS = 8;            // mma kernel (the gemv kernel takes its warp count as a template argument)
constexpr int U = 4;                // column units per step (scale-table granularity)
constexpr int SMEM_BUDGET = 47104;  // bytes of dynamic shared memory per block (under the 48 KB default)

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((u32)__cvta_generic_to_shared(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"((u32)__cvta_generic_to_shared(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
