// y[M, N] = x[M, K] @ dequant(W)^T (+ bias), W of b-bit integers (b = 4 or 8) with
// one scale (and, asymmetric, one zero point) per group of K columns, x and y in
// float16 or bfloat16, float32 accumulation on the tensor cores (mma.sync m16n8k16).
//
// The product is computed transposed, y^T = W x^T: 16 weight rows are the mma's
// A operand (dequantized in registers straight from the packed words) and 8 tokens
// its B operand, so a decode step (M = 1..8) wastes no weight bandwidth; M > 8
// takes NT = 2, 4, 8 tiles of 8 tokens, M > 8 * NT more blocks along grid.z.
//
// Weight layout (built at load time by quantkit.kernels.int_weight_cuda.repack):
//   the weight, padded to Np = 32 * RB rows and Kp = 32 * KS columns, is cut into
//   units of 32 rows x 32 columns, stored unit (rb, ks) at ((rb * KS + ks) * PARTS)
//   uint4 * 32 lanes, PARTS = BITS / 4. Lane l = 4 g + t holds, for each of the
//   unit's four 16 x 16 mma tiles (rt = row half, h = column half), the eight
//   values an mma A fragment needs: rows g and g + 8, columns 2t, 2t + 1, 2t + 8,
//   2t + 9 of the tile, as unsigned u = q + 2^(b-1):
//     4-bit: word rt * 2 + h; nibble r + 4c is row g + 8 (r & 1), column
//            2t + c + 8 (r >> 1)  -> (w >> 4r) & 0x000f000f is A register r.
//     8-bit: part rt, words h * 2 + hc; byte hr + 2c is row g + 8 hr, column
//            2t + c + 8 hc       -> (w >> 8 hr) & 0x00ff00ff is A register 2 hc + hr.
//   scales (and zeros): [G, RB, 8, 4], entry [grp, rb, g, j] for row 32 rb + g + 8 j.
//   A zero is stored as BASE + u_z (u_z = z + 2^(b-1)), BASE the magic offset below,
//   so that (BASE + u) - (BASE + u_z) = q - z exactly and one multiply by the scale
//   rounds (q - z) * s once, as the reference does.
//
// K splits: blockIdx.y takes `steps_per_split` of the KS column units; when
// gridDim.y > 1 each block writes float32 partial sums to `ws` [S, M, Np] and the
// last block of a tile to finish (a counter per tile, reset by that block) adds the
// S partials in order and writes y: deterministic, one launch.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned int u32;

template <typename T> struct Pair;
template <> struct Pair<__half> { typedef __half2 type; };
template <> struct Pair<__nv_bfloat16> { typedef __nv_bfloat162 type; };

// (BASE + u) as a pair of T from the masked bits: the "magic number" conversion
// for fp16 (1024 + u, exact for u < 1024) and 4-bit bf16 (128 + u); 8-bit bf16
// (128 + u would not be exact) converts through float instead.
template <typename T, int BITS> struct Magic;
template <int BITS> struct Magic<__half, BITS> {
    static constexpr float base = 1024.0f;
    __device__ static __forceinline__ u32 pair(u32 w, u32 mask) { return (w & mask) | 0x64006400u; }
};
template <> struct Magic<__nv_bfloat16, 4> {
    static constexpr float base = 128.0f;
    __device__ static __forceinline__ u32 pair(u32 w, u32 mask) { return (w & mask) | 0x43004300u; }
};
template <> struct Magic<__nv_bfloat16, 8> {
    static constexpr float base = 0.0f;
    __device__ static __forceinline__ u32 pair(u32 w, u32 mask) {
        __nv_bfloat162 v = __floats2bfloat162_rn((float)(w & 0xffu), (float)((w >> 16) & 0xffu));
        return *reinterpret_cast<u32*>(&v);
    }
};

template <typename T>
__device__ __forceinline__ u32 sub_mul(u32 v, typename Pair<T>::type z, typename Pair<T>::type s) {
    typedef typename Pair<T>::type T2;
    T2 r = __hmul2(__hsub2(*reinterpret_cast<T2*>(&v), z), s);
    return *reinterpret_cast<u32*>(&r);
}

// The four A registers of one 16 x 16 tile. z0/s0: row g, z1/s1: row g + 8.
template <typename T, int BITS>
__device__ __forceinline__ void dequant_tile(const u32* w, u32 a[4], typename Pair<T>::type z0, typename Pair<T>::type z1,
                                             typename Pair<T>::type s0, typename Pair<T>::type s1) {
    if (BITS == 4) {
        const u32 m = 0x000f000fu;
        a[0] = sub_mul<T>(Magic<T, BITS>::pair(w[0], m), z0, s0);
        a[1] = sub_mul<T>(Magic<T, BITS>::pair(w[0] >> 4, m), z1, s1);
        a[2] = sub_mul<T>(Magic<T, BITS>::pair(w[0] >> 8, m), z0, s0);
        a[3] = sub_mul<T>(Magic<T, BITS>::pair(w[0] >> 12, m), z1, s1);
    } else {
        const u32 m = 0x00ff00ffu;
        a[0] = sub_mul<T>(Magic<T, BITS>::pair(w[0], m), z0, s0);
        a[1] = sub_mul<T>(Magic<T, BITS>::pair(w[0] >> 8, m), z1, s1);
        a[2] = sub_mul<T>(Magic<T, BITS>::pair(w[1], m), z0, s0);
        a[3] = sub_mul<T>(Magic<T, BITS>::pair(w[1] >> 8, m), z1, s1);
    }
}

// The four A registers of one tile as BASE + u, unscaled (the kernel folds zero and scale per group).
template <typename T, int BITS>
__device__ __forceinline__ void raw_tile(const u32* w, u32 a[4]) {
    if (BITS == 4) {
        const u32 m = 0x000f000fu;
        a[0] = Magic<T, BITS>::pair(w[0], m);
        a[1] = Magic<T, BITS>::pair(w[0] >> 4, m);
        a[2] = Magic<T, BITS>::pair(w[0] >> 8, m);
        a[3] = Magic<T, BITS>::pair(w[0] >> 12, m);
    } else {
        const u32 m = 0x00ff00ffu;
        a[0] = Magic<T, BITS>::pair(w[0], m);
        a[1] = Magic<T, BITS>::pair(w[0] >> 8, m);
        a[2] = Magic<T, BITS>::pair(w[1], m);
        a[3] = Magic<T, BITS>::pair(w[1] >> 8, m);
    }
}

template <typename T> struct ONE_PAIR;
template <> struct ONE_PAIR<__half> { static constexpr u32 value = 0x3c003c00u; };
template <> struct ONE_PAIR<__nv_bfloat16> { static constexpr u32 value = 0x3f803f80u; };

// ks / group_steps as a multiply-high: group_magic = ceil(2^32 / group_steps) (exact for ks, group_steps < 4096).
__device__ __forceinline__ int group_of(int ks, unsigned long long group_magic) {
    return (int)(((unsigned long long)ks * group_magic) >> 32);
}

template <typename T> __device__ __forceinline__ void mma(float c[4], const u32 a[4], const u32 b[2]);
template <> __device__ __forceinline__ void mma<__half>(float c[4], const u32 a[4], const u32 b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float c[4], const u32 a[4], const u32 b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Weights are read once: keep them out of L1 (x and the scales live there).
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
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

constexpr int WARPS = 8;
constexpr int SMEM_BUDGET = 47104;  // bytes of dynamic shared memory per block (under the 48 KB default)

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((u32)__cvta_generic_to_shared(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"((u32)__cvta_generic_to_shared(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Pipeline depth: each warp streams its own column units through a ring of STAGES
// slots (weights, scales, zeros of one unit), STAGES - 1 of them in flight.
template <int BITS, bool ASYM> struct Ring {
    static constexpr int PARTS = BITS / 4;
    static constexpr int LANE_BYTES = 16 * PARTS + 8 + (ASYM ? 8 : 0);
    static constexpr int STAGES = SMEM_BUDGET / (WARPS * 32 * LANE_BYTES) < 8 ? SMEM_BUDGET / (WARPS * 32 * LANE_BYTES) : 8;
    static constexpr int BYTES = WARPS * STAGES * 32 * LANE_BYTES;
};

// x: NT == 1 reads the rows straight from x (row stride ldx, columns padded to Kp);
// NT > 1 reads xf, x permuted by permute_x into the mma B-fragment order:
// [Z, KS, NT, 32 lanes, 4 words], word 2h + r of lane 4g + t = x[m, 32 ks + 16 h + 8 r + 2t .. +1].
template <typename T, int BITS, int NT, bool ASYM>
__device__ void int_weight_mma(const T* __restrict__ x, const uint4* __restrict__ xf, const uint4* __restrict__ w,
                               const T* __restrict__ scales, const T* __restrict__ zeros, const T* __restrict__ bias,
                               T* __restrict__ y, float* __restrict__ ws, u32* __restrict__ counters, int M, int N, int Kp,
                               int ldx, int ldy, unsigned long long group_magic, int steps_per_split) {
    typedef Ring<BITS, ASYM> R;
    constexpr int PARTS = R::PARTS, STAGES = R::STAGES;
    const int KS = Kp / 32, RB = gridDim.x;
    const int rb = blockIdx.x, split = blockIdx.y, m0 = blockIdx.z * NT * 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k_begin = split * steps_per_split, k_end = min(KS, k_begin + steps_per_split);

    extern __shared__ uint4 smem[];
    uint4* wring = smem + warp * STAGES * PARTS * 32;                                    // [STAGES][PARTS][32]
    uint2* sring = reinterpret_cast<uint2*>(smem + WARPS * STAGES * PARTS * 32) + warp * STAGES * 32;  // [STAGES][32]
    uint2* zring = sring + WARPS * STAGES * 32;

    const T* xrow = (NT == 1 && m0 + g < M) ? x + (size_t)(m0 + g) * ldx + 2 * t : nullptr;
    const uint4* xfp = xf + (size_t)blockIdx.z * KS * NT * 32 + lane;
    const uint4* wp = w + (size_t)rb * KS * PARTS * 32 + lane;
    const T sym_zero = from_float<T>(Magic<T, BITS>::base + (float)(1 << (BITS - 1)));

    // This warp's contiguous run of column units (groups stay put for several steps).
    const int per_warp = (k_end - k_begin + WARPS - 1) / WARPS;
    const int first = k_begin + warp * per_warp;
    const int steps = max(0, min(k_end, first + per_warp) - first);
    const uint4* wsrc = wp + (size_t)first * PARTS * 32;
    int issue_slot = 0;
    auto issue = [&](int i) {
        if (i < steps) {
            const int ks = first + i;
#pragma unroll
            for (int p = 0; p < PARTS; ++p) cp_async16(&wring[(issue_slot * PARTS + p) * 32 + lane], wsrc + p * 32);
            const size_t sidx = (((size_t)group_of(ks, group_magic) * RB + rb) * 8 + g) * 4;
            cp_async8(&sring[issue_slot * 32 + lane], scales + sidx);
            if (ASYM) cp_async8(&zring[issue_slot * 32 + lane], zeros + sidx);
            wsrc += PARTS * 32;
            issue_slot = issue_slot + 1 == STAGES ? 0 : issue_slot + 1;
        }
        cp_async_commit();  // an empty group keeps the wait count uniform
    };

    // The mma multiplies x by BASE + u (no per-weight subtract or scale); per group,
    // acc += s * (part - (BASE + u_z) * sum(x)), sum(x) from an mma with an all-ones A.
    float acc[2][NT][4], part[2][NT][4], xsum[NT][4];
#pragma unroll
    for (int rt = 0; rt < 2; ++rt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[rt][nt][i] = part[rt][nt][i] = xsum[nt][i] = 0.0f;
    int group = -1;
    uint2 gscale = make_uint2(0u, 0u), gzero = make_uint2(0u, 0u);
    auto fold = [&]() {
        const T* s4 = reinterpret_cast<const T*>(&gscale);
        const T* z4 = reinterpret_cast<const T*>(&gzero);
#pragma unroll
        for (int rt = 0; rt < 2; ++rt) {
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                const float sr = to_float<T>(s4[2 * rt + hr]), zr = to_float<T>(ASYM ? z4[2 * rt + hr] : sym_zero);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int i = 2 * hr + c;
                        acc[rt][nt][i] = fmaf(sr, fmaf(-zr, xsum[nt][i], part[rt][nt][i]), acc[rt][nt][i]);
                        part[rt][nt][i] = 0.0f;
                    }
            }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) xsum[nt][i] = 0.0f;
    };
    const u32 ones[4] = {ONE_PAIR<T>::value, ONE_PAIR<T>::value, ONE_PAIR<T>::value, ONE_PAIR<T>::value};

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s);
    int slot = 0;
    for (int i = 0; i < steps; ++i) {
        issue(i + STAGES - 1);
        const int ks = first + i;
        u32 b[NT][2][2];
        if (NT == 1) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (xrow != nullptr) {
                    b[0][h][0] = __ldg(reinterpret_cast<const u32*>(xrow + ks * 32 + h * 16));
                    b[0][h][1] = __ldg(reinterpret_cast<const u32*>(xrow + ks * 32 + h * 16 + 8));
                } else {
                    b[0][h][0] = b[0][h][1] = 0u;
                }
            }
        } else {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const uint4 v = __ldg(xfp + ((size_t)ks * NT + nt) * 32);
                b[nt][0][0] = v.x;
                b[nt][0][1] = v.y;
                b[nt][1][0] = v.z;
                b[nt][1][1] = v.w;
            }
        }
        cp_async_wait<STAGES - 1>();  // this lane's copies of step i have landed (each lane reads only its own)
        uint4 q[PARTS];
#pragma unroll
        for (int p = 0; p < PARTS; ++p) q[p] = wring[(slot * PARTS + p) * 32 + lane];
        const int grp = group_of(ks, group_magic);
        if (grp != group) {  // warp-uniform
            if (group >= 0) fold();
            group = grp;
            gscale = sring[slot * 32 + lane];
            if (ASYM) gzero = zring[slot * 32 + lane];
        }
        slot = slot + 1 == STAGES ? 0 : slot + 1;
#pragma unroll
        for (int rt = 0; rt < 2; ++rt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                u32 a[4];
                raw_tile<T, BITS>(reinterpret_cast<const u32*>(&q[PARTS == 1 ? 0 : rt]) + (PARTS == 1 ? rt * 2 + h : h * 2), a);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma<T>(part[rt][nt], a, b[nt][h]);
            }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) mma<T>(xsum[nt], ones, b[nt][h]);
    }
    if (group >= 0) fold();
    cp_async_wait<0>();
    __syncthreads();  // the ring is reused below

    // Sum the warps' partial tiles, 8 accumulators (one token tile) per round.
    float (*red)[8][32] = reinterpret_cast<float (*)[8][32]>(smem);  // [WARPS][8][32]
    __shared__ u32 is_last;
    const int Np = RB * 32, splits = gridDim.y;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int rt = 0; rt < 2; ++rt)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[warp][rt * 4 + i][lane] = acc[rt][nt][i];
        __syncthreads();
        {
            const int c = threadIdx.x >> 5, ln = threadIdx.x & 31;  // 256 threads: 8 accumulators x 32 lanes
            float v = 0.0f;
#pragma unroll
            for (int wi = 0; wi < WARPS; ++wi) v += red[wi][c][ln];
            const int rt = c >> 2, i = c & 3;
            const int n = rb * 32 + rt * 16 + (ln >> 2) + (i >= 2 ? 8 : 0);
            const int m = m0 + nt * 8 + 2 * (ln & 3) + (i & 1);
            if (m < M) {
                if (splits == 1) {
                    if (n < N) y[(size_t)m * ldy + n] = from_float<T>(bias != nullptr ? v + to_float<T>(bias[n]) : v);
                } else {
                    ws[((size_t)split * M + m) * Np + n] = v;
                }
            }
        }
        __syncthreads();
    }
    if (splits == 1) return;

    // Split K: the last block of this tile adds the partials in split order.
    __threadfence();
    __syncthreads();
    u32* counter = counters + (size_t)blockIdx.z * RB + rb;
    if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == (u32)(splits - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int item = threadIdx.x; item < NT * 8 * 32; item += blockDim.x) {
        const int m = m0 + item / 32, n = rb * 32 + item % 32;
        if (m >= M || n >= N) continue;
        float v = 0.0f;
        for (int s = 0; s < splits; ++s) v += __ldcg(ws + ((size_t)s * M + m) * Np + n);
        y[(size_t)m * ldy + n] = from_float<T>(bias != nullptr ? v + to_float<T>(bias[n]) : v);
    }
    if (threadIdx.x == 0) *counter = 0u;
}

// x [M, K] (row stride ldx, columns gathered through perm when given) -> xf, the
// B-fragment order int_weight_mma reads for NT > 1 (zeros past M and K).
template <typename T>
__device__ void permute_x(const T* __restrict__ x, const long long* __restrict__ perm, T* __restrict__ xf, int M, int K,
                          long long ldx, int KS, int NT, size_t total_words) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total_words) return;
    const int j = idx & 3, lane = (idx >> 2) & 31;
    const size_t rest = idx >> 7;  // (z * KS + ks) * NT + nt
    const int nt = rest % NT, ks = (rest / NT) % KS, z = rest / ((size_t)NT * KS);
    const int m = (z * NT + nt) * 8 + (lane >> 2);
    const int col = ks * 32 + (j >> 1) * 16 + (j & 1) * 8 + 2 * (lane & 3);
    T v[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const int k = col + c;
        v[c] = (m < M && k < K) ? x[(size_t)m * ldx + (perm != nullptr ? perm[k] : k)] : from_float<T>(0.0f);
    }
    xf[2 * idx] = v[0];
    xf[2 * idx + 1] = v[1];
}

// W dequantized to a dense T [Np, Kp] (row stride Kp): one warp per 32 x 32 unit,
// staged through shared memory so that each row goes out in 16-byte stores.
template <typename T, int BITS, bool ASYM>
__device__ void int_weight_dequant(const uint4* __restrict__ w, const T* __restrict__ scales,
                                   const T* __restrict__ zeros, T* __restrict__ out, int RB, int KS, int group_steps) {
    typedef typename Pair<T>::type T2;
    constexpr int PARTS = BITS / 4, ROW = 20;  // u32 per staged row: 16 + 4 of padding (banks)
    __shared__ __align__(16) u32 tile[WARPS][32 * ROW];
    const int warp = threadIdx.x >> 5;
    const size_t unit = (size_t)blockIdx.x * WARPS + warp;
    if (unit >= (size_t)RB * KS) return;
    const int rb = unit / KS, ks = unit % KS, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    uint4 q[PARTS];
#pragma unroll
    for (int p = 0; p < PARTS; ++p) q[p] = load_stream(w + (unit * PARTS + p) * 32 + lane);
    const size_t sidx = (((size_t)(ks / group_steps) * RB + rb) * 8 + g) * 4;
    const T* s4 = scales + sidx;
    const T sym_zero = from_float<T>(Magic<T, BITS>::base + (float)(1 << (BITS - 1)));
    u32* my = tile[warp];
#pragma unroll
    for (int rt = 0; rt < 2; ++rt) {
        const T2 s0 = splat<T>(s4[2 * rt]), s1 = splat<T>(s4[2 * rt + 1]);
        const T2 z0 = splat<T>(ASYM ? zeros[sidx + 2 * rt] : sym_zero), z1 = splat<T>(ASYM ? zeros[sidx + 2 * rt + 1] : sym_zero);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32* words = reinterpret_cast<const u32*>(&q[PARTS == 1 ? 0 : rt]);
            u32 a[4];
            dequant_tile<T, BITS>(words + (PARTS == 1 ? rt * 2 + h : h * 2), a, z0, z1, s0, s1);
            const int row = rt * 16 + g, pair = h * 8 + t;
            my[row * ROW + pair] = a[0];
            my[(row + 8) * ROW + pair] = a[1];
            my[row * ROW + pair + 4] = a[2];
            my[(row + 8) * ROW + pair + 4] = a[3];
        }
    }
    __syncwarp();
    const size_t Kp = (size_t)KS * 32;
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int c = it * 32 + lane, row = c >> 2, part = c & 3;  // 4 lanes cover one 64-byte row
        *reinterpret_cast<uint4*>(out + ((size_t)rb * 32 + row) * Kp + (size_t)ks * 32 + part * 8) =
            *reinterpret_cast<const uint4*>(&my[row * ROW + part * 4]);
    }
}

#define MMA_KERNEL(NAME, T, BITS, NT, ASYM)                                                                       \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                                       \
        const T* x, const uint4* xf, const uint4* w, const T* scales, const T* zeros, const T* bias, T* y,        \
        float* ws, u32* counters, int M, int N, int Kp, int ldx, int ldy, unsigned long long group_magic,        \
        int steps_per_split) {                                                                                    \
        int_weight_mma<T, BITS, NT, ASYM>(x, xf, w, scales, zeros, bias, y, ws, counters, M, N, Kp, ldx, ldy,     \
                                          group_magic, steps_per_split);                                          \
    }
#define MMA_NTS(SUFFIX, T, BITS, ASYM)                                   \
    MMA_KERNEL(int_weight_mma_##SUFFIX##_nt1, T, BITS, 1, ASYM)          \
    MMA_KERNEL(int_weight_mma_##SUFFIX##_nt2, T, BITS, 2, ASYM)          \
    MMA_KERNEL(int_weight_mma_##SUFFIX##_nt4, T, BITS, 4, ASYM)          \
    MMA_KERNEL(int_weight_mma_##SUFFIX##_nt8, T, BITS, 8, ASYM)
#define DEQUANT_KERNEL(SUFFIX, T, BITS, ASYM)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) int_weight_dequant_##SUFFIX(                                \
        const uint4* w, const T* scales, const T* zeros, T* out, int RB, int KS, int group_steps) {               \
        int_weight_dequant<T, BITS, ASYM>(w, scales, zeros, out, RB, KS, group_steps);                            \
    }
#define ALL(SUFFIX, T, BITS, ASYM) MMA_NTS(SUFFIX, T, BITS, ASYM) DEQUANT_KERNEL(SUFFIX, T, BITS, ASYM)

#define PERMUTE_KERNEL(SUFFIX, T)                                                                                 \
    extern "C" __global__ void permute_x_##SUFFIX(const T* x, const long long* perm, T* xf, int M, int K,           \
                                                  long long ldx, int KS, int NT, size_t total_words) {            \
        permute_x<T>(x, perm, xf, M, K, ldx, KS, NT, total_words);                                                \
    }
PERMUTE_KERNEL(f16, __half)
PERMUTE_KERNEL(bf16, __nv_bfloat16)

ALL(f16_b4_sym, __half, 4, false)
ALL(f16_b4_asym, __half, 4, true)
ALL(f16_b8_sym, __half, 8, false)
ALL(f16_b8_asym, __half, 8, true)
ALL(bf16_b4_sym, __nv_bfloat16, 4, false)
ALL(bf16_b4_asym, __nv_bfloat16, 4, true)
ALL(bf16_b8_sym, __nv_bfloat16, 8, false)
ALL(bf16_b8_asym, __nv_bfloat16, 8, true)
