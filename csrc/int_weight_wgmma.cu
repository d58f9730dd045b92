// y[M, N] = x[M, K] @ dequant(W)^T (+ bias) for 4-bit weights and many tokens (M >= 17), on
// Hopper's warpgroup MMA (wgmma, sm_90a only: quantkit.kernels.cuda.ARCH_SPECIFIC).
//
// Same weight layout, scale tables and product orientation as csrc/int_weight_mma.cu (its
// header describes them): y^T = W x^T, 64 weight rows per warpgroup as wgmma's A operand and up
// to 256 tokens as its N dimension, so the decode kernel and this one read one repacked weight.
//
// A block is two warpgroups (256 threads) and a tile of 128 weight rows (4 row blocks of 32)
// x BN tokens (32, 64, 128, 256). K advances in k-tiles of 64 columns (2 units). Per k-tile:
//   - each thread cp.asyncs the two 8-byte halves of units its A fragments need and their scales
//     (and zeros) into a ring of STAGES slots, and the block BN x 64 columns of x in 16-byte
//     chunks (zero past M and past K); the ring runs STAGES - 1 k-tiles ahead of the wgmma;
//   - warp w4 of a warpgroup holds rows 16 w4 .. 16 w4 + 15 of its 64: the lane's word of a unit
//     already is wgmma's A fragment of a k16 step, so it is dequantized in registers,
//     (q - z) * s rounded once in T (the batch kernel's rounding), and handed to wgmma as is;
//     its K order is the fragment's, so x comes permuted within each unit (fragment_order in
//     quantkit/kernels/launch_int_weight_wgmma.py);
//   - the warpgroup issues 4 wgmma k16 steps on k-tile i, waits until k-tile i - 1's have retired
//     (wgmma.wait_group 1), and only then rewrites k-tile i - 1's registers with k-tile i + 1
//     (two register sets, the loop unrolled by two): the order that makes the register operands
//     safe (the race of the register-operand attempt in csrc/NOTES.md, v5), with no pins that
//     would make ptxas serialize the wgmmas.
// x tiles are in wgmma's 128-byte swizzle, K-major: token n's 128 bytes of a k-tile at n * 128,
// 16-byte chunk c at chunk c ^ (n & 7); descriptors step 1024 bytes per 8 tokens, and a k16 step
// starts 32 bytes further. A variant with A in shared memory ("ss") lost at every shape and M
// measured (csrc/NOTES.md, v6); it is kept under the git tag wgmma-ss-variant. The warp-specialized
// variants, fed by bulk copies, are csrc/int_weight_wgmma_ws.cu; the code both use, int_weight_wgmma_common.cuh.
//
// K splits: blockIdx.y takes `kt_per_split` k-tiles; with gridDim.y > 1 each block writes its
// float32 partial tile to ws [S, M, 128 gridDim.x] and the last block of the tile to arrive (a
// counter per tile, reset by it) adds the S partials in split order: deterministic.
#include "int_weight_wgmma_common.cuh"

// BN tokens x 64 columns of x, k-tile kt, into a ring slot (swizzled rows of 128 bytes): thread chunk c is
// token c >> 3, 16-byte chunk c & 7 (8 threads read one token's 128 bytes); zeros past M and K.
template <typename T, int BN>
__device__ __forceinline__ void load_x_tile(unsigned char* xs, const T* __restrict__ x, int kt, int m0, int M, int K,
                                            int ldx) {
#pragma unroll
    for (int j = 0; j < BN / 32; ++j) {
        const int c = threadIdx.x + j * 256;
        const int n = c >> 3, m = m0 + n, col = kt * BK + (c & 7) * 8;
        const bool ok = m < M && col < K;
        cp_async16_or_zero(xs + swizzled(n, c & 7), x + (size_t)(ok ? m : 0) * ldx + (ok ? col : 0), ok);
    }
}

template <int BN, bool ASYM> struct SmemRS {
    static constexpr int X = BN * BK * 2;  // one stage of x
    static constexpr int W = 256 * 16;     // one stage of weights: two 8-byte halves of units a thread
    static constexpr int S = 256 * 8;      // one stage of scales (and as much of zeros): two 4-byte pairs a thread
    static constexpr int STAGE = X + W + S * (ASYM ? 2 : 1);
};

template <typename T, bool ASYM, int BN, int STAGES>
__device__ void int_weight_wgmma_rs(const T* __restrict__ x, const uint4* __restrict__ w, const T* __restrict__ scales,
                                    const T* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
                                    float* __restrict__ ws, u32* __restrict__ counters, int M, int N, int K, int RB,
                                    int KS, int ldx, int ldy, int tr, int sshift, int sps, int kt_per_split) {
    typedef typename Pair<T>::type T2;
    typedef SmemRS<BN, ASYM> L;
    constexpr int ACC = BN / 2;
    static_assert(STAGES >= 3, "the ring runs STAGES - 1 k-tiles ahead of the wgmma");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* smem = aligned_smem(smem_raw);
    const int tid = threadIdx.x, wg = tid >> 7, w4 = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2;
    const int KT = KS / 2;
    const int kt_begin = blockIdx.y * kt_per_split, nkt = min(KT, kt_begin + kt_per_split) - kt_begin;
    const int m0 = blockIdx.z * BN;
    const int rt = w4 & 1;
    const int rb = min((int)blockIdx.x * 4 + 2 * wg + (w4 >> 1), RB - 1);
    const uint2* wq = reinterpret_cast<const uint2*>(w) + ((size_t)rb * KS * 32 + lane) * 2 + rt;  // + ks * 64
    const size_t trow = (size_t)rb * tr * sps * 32 + g * 4 + 2 * rt;  // rows g + 16 rt, g + 8 + 16 rt
    auto slot_at = [&](int slot, int off) { return smem + slot * L::STAGE + off; };

    auto issue = [&](int i) {
        if (i < nkt) {
            const int kt = kt_begin + i, slot = i % STAGES;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int ks = 2 * kt + u;
                cp_async8(reinterpret_cast<uint2*>(slot_at(slot, L::X)) + 2 * tid + u, wq + (size_t)ks * 64);
                const size_t sidx = trow + ((size_t)((ks >> 2) >> sshift) * sps + ((ks & 3) & (sps - 1))) * 32;
                cp_async4(reinterpret_cast<u32*>(slot_at(slot, L::X + L::W)) + 2 * tid + u, scales + sidx);
                if (ASYM) cp_async4(reinterpret_cast<u32*>(slot_at(slot, L::X + L::W + L::S)) + 2 * tid + u, zeros + sidx);
            }
            load_x_tile<T, BN>(slot_at(slot, 0), x, kt, m0, M, K, ldx);
        }
        cp_async_commit();
    };
    const T2 sym_zero = splat<T>(from_float<T>(Magic<T, 4>::base + 8.0f));
    auto dequant = [&](int i, u32 (&a)[16]) {  // k-tile i's A registers: [unit][h][4]
        const int slot = i % STAGES;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const uint2 q = reinterpret_cast<const uint2*>(slot_at(slot, L::X))[2 * tid + u];
            const u32 s = reinterpret_cast<const u32*>(slot_at(slot, L::X + L::W))[2 * tid + u];
            const u32 z = ASYM ? reinterpret_cast<const u32*>(slot_at(slot, L::X + L::W + L::S))[2 * tid + u] : 0u;
            const RowParams<T, ASYM> p(s, z, sym_zero);
            Tile16<T>::dequant(q.x, a + 8 * u, p.z0, p.z1, p.s0, p.s1);
            Tile16<T>::dequant(q.y, a + 8 * u + 4, p.z0, p.z1, p.s0, p.s1);
        }
    };

    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.0f;
    auto step = [&](int i, u32 (&cur)[16], u32 (&nxt)[16]) {
        mma_ktile_retire_previous<T, BN>(acc, cur, slot_at(i % STAGES, 0));  // k-tile i - 1's registers (nxt),
        //                                                                       and its ring slot, are free
        if (i + 1 < nkt) {
            cp_async_wait<STAGES - 3>();  // k-tile i + 1 has landed (this thread's copies)
            fence_async_smem();
            __syncthreads();  // everyone's copies; both warpgroups retired k-tile i - 1
            issue(i + STAGES - 1);
            dequant(i + 1, nxt);
        }
    };

    pdl_wait();
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) issue(i);
    u32 a0[16], a1[16];
    if (nkt > 0) {
        cp_async_wait<STAGES - 2>();
        fence_async_smem();
        __syncthreads();
        dequant(0, a0);
    }
    for (int i = 0; i < nkt; i += 2) {
        step(i, a0, a1);
        if (i + 1 < nkt) step(i + 1, a1, a0);
    }
    wgmma_wait<0>();
    fence_acc<ACC>(acc);
    cp_async_wait<0>();
    pdl_trigger();
    store_tile<T, BN>(acc, bias, y, ws, counters, M, N, ldy, m0);
}

#define WGMMA_KERNEL(KIND, SUFFIX, T, ASYM, BN, STAGES)                                                                  \
    extern "C" __global__ void __launch_bounds__(256, BN > 128 ? 1 : 2)                                                  \
        int_weight_wgmma_##KIND##_##SUFFIX##_bn##BN##_s##STAGES(                                                         \
        const T* x, const uint4* w, const T* scales, const T* zeros, const T* bias, T* y, float* ws, u32* counters,       \
        int M, int N, int K, int RB, int KS, int ldx, int ldy, int tr, int sshift, int sps, int kt_per_split) {           \
        int_weight_wgmma_##KIND<T, ASYM, BN, STAGES>(x, w, scales, zeros, bias, y, ws, counters, M, N, K, RB, KS, ldx,   \
                                                     ldy, tr, sshift, sps, kt_per_split);                                 \
    }
// Ring depth per token tile (quantkit.kernels.launch_int_weight_wgmma.STAGES): as deep as keeps two blocks
// on a multiprocessor for BN <= 128 (one block of two warpgroups alone stalls on its per-k-tile barrier:
// ncu, csrc/NOTES.md v6), what fits one block for BN = 256.
#define WGMMA_TILES(KIND, SUFFIX, T, ASYM)                                                \
    WGMMA_KERNEL(KIND, SUFFIX, T, ASYM, 32, 6) WGMMA_KERNEL(KIND, SUFFIX, T, ASYM, 64, 6)   \
    WGMMA_KERNEL(KIND, SUFFIX, T, ASYM, 128, 4) WGMMA_KERNEL(KIND, SUFFIX, T, ASYM, 256, 4)
#define WGMMA_ALL(SUFFIX, T, ASYM) WGMMA_TILES(rs, SUFFIX, T, ASYM)

WGMMA_ALL(f16_b4_sym, __half, false)
WGMMA_ALL(f16_b4_asym, __half, true)
WGMMA_ALL(bf16_b4_sym, __nv_bfloat16, false)
WGMMA_ALL(bf16_b4_asym, __nv_bfloat16, true)
