// y[M, N] = x[M, K] @ dequant(W)^T (+ bias) for 4- and 8-bit weights and many tokens, on Hopper's wgmma
// (sm_90a only: quantkit.kernels.cuda.ARCH_SPECIFIC): the warp-specialized variants of csrc/int_weight_wgmma.cu,
// whose header describes the weight layout, the register A operand, the x tiles and the K splits they share.
// "ws": two consumer warpgroups (128 weight rows a block), "ws4": four (256 rows); csrc/NOTES.md (v7).
#include "int_weight_wgmma_common.cuh"

// ---- WS: warp-specialized, the ring fed by the copy engine (TMA bulk copies) -------------------------------
// The rs kernel's consumers (WGS warpgroups of 64 weight rows, the same registers and wgmma order), fed by
// the first warp of a producer warpgroup instead of their own cp.async: per k-tile its lanes issue bulk
// copies (cp.async.bulk, the async proxy: no proxy fence) of the 2 WGS row blocks' words, their 64-byte
// scale (and zero) rows, and the x tile, which wgmma_x_tiles has laid out beforehand exactly as the slot
// holds it (fragment order, 128-byte swizzle, zeros past M and K: one contiguous BN x 128-byte copy).
// full[s] completes when a slot's bytes have landed (the producer's expect_tx), empty[s] when the 4 WGS
// consumer warps have retired the wgmma that read it: the warpgroups never meet at a block-wide barrier,
// and the producer runs STAGES k-tiles ahead.
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Waits for the phase of `parity` to complete. A wait past 2^32 cycles (seconds: no copy or wgmma takes
// that long) traps, so that a broken pipeline is a launch error, not a hung GPU.
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    const u32 a = smem_u32(bar);
    u32 done;
    long long start = 0;
    for (;;) {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(a), "r"(parity) : "memory");
        if (done) return;
        if (start == 0) start = clock64();
        else if (clock64() - start > (1ll << 32)) __trap();
    }
}
__device__ __forceinline__ void bulk_copy(void* smem, const void* gmem, u32 bytes, u64* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(smem_u32(smem)), "l"(gmem), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}

// x [M, ldx] -> xt [ceil(M / BN)][KS / 2][BN][64]: each k-tile of a token tile as the ws kernel's slot holds
// it. Thread (m, unit) reads the unit's 32 columns (16 words) and writes its 4 chunks: chunk q of the unit
// in fragment order is words q, 4 + q, 8 + q, 12 + q (fragment_order), at chunk c ^ (m & 7) of the row.
template <typename T, int BN>
__device__ __forceinline__ void wgmma_x_tiles(const T* __restrict__ x, T* __restrict__ xt, int M, int K, int KS,
                                              int ldx, int Mp) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= Mp * KS) return;
    const int m = idx / KS, unit = idx - m * KS;
    u32 v[16];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int col = unit * 32 + q * 8;
        uint4 c = make_uint4(0u, 0u, 0u, 0u);
        if (m < M && col < K) c = *reinterpret_cast<const uint4*>(x + (size_t)m * ldx + col);
        v[4 * q] = c.x, v[4 * q + 1] = c.y, v[4 * q + 2] = c.z, v[4 * q + 3] = c.w;
    }
    const int n = m % BN;
    T* row = xt + (((size_t)(m / BN) * (KS / 2) + (unit >> 1)) * BN + n) * BK;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int c = (unit & 1) * 4 + q;
        *reinterpret_cast<uint4*>(row + ((c ^ (n & 7)) << 3)) = make_uint4(v[q], v[4 + q], v[8 + q], v[12 + q]);
    }
}
#define X_TILES_KERNEL(SUFFIX, T, BN)                                                                                \
    extern "C" __global__ void __launch_bounds__(256) wgmma_x_tiles_##SUFFIX##_bn##BN(                                \
        const T* x, T* xt, int M, int K, int KS, int ldx, int Mp) {                                                   \
        wgmma_x_tiles<T, BN>(x, xt, M, K, KS, ldx, Mp);                                                               \
    }
#define X_TILES(SUFFIX, T) \
    X_TILES_KERNEL(SUFFIX, T, 32) X_TILES_KERNEL(SUFFIX, T, 64) X_TILES_KERNEL(SUFFIX, T, 128) X_TILES_KERNEL(SUFFIX, T, 256)
X_TILES(f16, __half)
X_TILES(bf16, __nv_bfloat16)

template <int BN, bool ASYM, int STAGES, int BITS, int WGS> struct SmemWS {
    static constexpr int RB = 2 * WGS;     // row blocks of 32 per block
    static constexpr int X = BN * BK * 2;  // x tile: BN rows of 128 bytes (1024-byte multiple: the swizzle)
    static constexpr int UNIT = BITS / 4 * 512;  // one unit of a row block: BITS / 4 parts x 32 lanes x 16 bytes
    static constexpr int W = RB * 2 * UNIT;      // RB row blocks x 2 units
    static constexpr int S = RB * 2 * 64;  // RB row blocks x 2 units x 32 rows of scales
    static constexpr int W_AT = STAGES * X, S_AT = W_AT + STAGES * W, Z_AT = S_AT + STAGES * S;
    static constexpr int BYTES = Z_AT + (ASYM ? STAGES * S : 0);
    static constexpr u32 TX = X + W + S * (ASYM ? 2 : 1);  // bytes a slot's copies bring
};

// Registers: ptxas caps a 9-warp block at 168 a thread (one block per SM), where the BN = 256 consumers
// spill; so the producer is a whole warpgroup (warps 8-11, only warp 8 copies) that gives its registers
// back (setmaxnreg) to the consumers, as warp-specialized Hopper GEMMs do.
// setmaxnreg moves registers within what the block was launched with: ptxas gives a kernel that uses it the
// launch bound's cap (CAP: 168 for 384 threads, 80 for 384 x 2 blocks, 96 for 640), so the producer's and
// consumers' counts must add up to no more than CAP x threads, or setmaxnreg.inc waits forever.
template <int MINB, int WGS> struct WsRegs {
    static constexpr int THREADS = 128 * WGS + 128;
    static constexpr int CAP = 65536 / (THREADS * MINB) / 8 * 8;
    static constexpr int PRODUCER = MINB == 1 && WGS == 2 ? 40 : 24;
    static constexpr int CONSUMER = (CAP * THREADS - 128 * PRODUCER) / (128 * WGS) / 8 * 8;  // 232, 104; 4 WGs: 112
    static_assert(CONSUMER >= CAP && 128 * PRODUCER + 128 * WGS * CONSUMER <= CAP * THREADS, "register budget");
};
template <int R> __device__ __forceinline__ void regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R)); }
template <int R> __device__ __forceinline__ void regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R)); }

template <typename T, int BITS, bool ASYM, int BN, int STAGES, int MINB, int WGS>
__device__ void int_weight_wgmma_ws(const T* __restrict__ xt, const uint4* __restrict__ w, const T* __restrict__ scales,
                                    const T* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
                                    float* __restrict__ ws, u32* __restrict__ counters, int M, int N, int RB, int KS,
                                    int ldy, int tr, int sshift, int sps, int kt_per_split) {
    typedef typename Pair<T>::type T2;
    typedef SmemWS<BN, ASYM, STAGES, BITS, WGS> L;
    constexpr int CONSUMERS = 128 * WGS;
    constexpr int ACC = BN / 2;
    static_assert(STAGES >= 3, "the producer refills k-tile i - 1's slot while the consumers read i and i + 1");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* smem = aligned_smem(smem_raw);
    __shared__ __align__(8) u64 full[STAGES], empty[STAGES];
    const int tid = threadIdx.x;
    const int KT = KS / 2;
    const int kt_begin = blockIdx.y * kt_per_split, nkt = min(KT, kt_begin + kt_per_split) - kt_begin;
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) mbar_init(&full[s], 1), mbar_init(&empty[s], 4 * WGS);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    pdl_wait();

    if (tid >= CONSUMERS) {  // the producer: warp 4 WGS's lanes issue the copies, lane c copies c, c + 32, ...
        regs_dec<WsRegs<MINB, WGS>::PRODUCER>();
        if (tid >= CONSUMERS + 32) return;
        // copy c: [0, RB) a row block's words; [RB, 3 RB) scales of (row block, unit) c - RB; then as many
        // zeros (asymmetric); last, the x tile
        constexpr int W_END = L::RB, S_END = 3 * L::RB, Z_END = S_END + (ASYM ? 2 * L::RB : 0), COPIES = Z_END + 1;
        const int lane = tid & 31;
        const T* xsrc = xt + (size_t)blockIdx.z * KT * BN * BK;
        for (int i = 0; i < nkt; ++i) {
            const int slot = i % STAGES, kt = kt_begin + i;
            if (i >= STAGES) mbar_wait(&empty[slot], ((i / STAGES) - 1) & 1);
            if (lane == 0) mbar_expect_tx(&full[slot], L::TX);
            __syncwarp();
#pragma unroll
            for (int c = lane; c < COPIES; c += 32) {
                if (c < W_END) {  // uint4 index ((rb KS + ks) parts + part) 32 + lane: the k-tile's 2 units in a row
                    const int rb = min((int)blockIdx.x * L::RB + c, RB - 1);
                    bulk_copy(smem + L::W_AT + slot * L::W + c * 2 * L::UNIT,
                              w + ((size_t)rb * KS + 2 * kt) * (BITS / 4) * 32, 2 * L::UNIT, &full[slot]);
                } else if (c < Z_END) {
                    const int jj = (c - W_END) % (2 * L::RB), ks = 2 * kt + (jj & 1);
                    const int rb = min((int)blockIdx.x * L::RB + (jj >> 1), RB - 1);
                    const size_t at = ((size_t)rb * tr * sps + ((ks >> 2) >> sshift) * sps + ((ks & 3) & (sps - 1))) * 32;
                    const bool z = c >= S_END;
                    bulk_copy(smem + (z ? L::Z_AT : L::S_AT) + slot * L::S + jj * 64, (z ? zeros : scales) + at, 64,
                              &full[slot]);
                } else {
                    bulk_copy(smem + slot * L::X, xsrc + (size_t)kt * BN * BK, L::X, &full[slot]);
                }
            }
        }
        return;
    }

    regs_inc<WsRegs<MINB, WGS>::CONSUMER>();
    const int wg = tid >> 7, w4 = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, rt = w4 & 1;
    const int j = 2 * wg + (w4 >> 1);  // the block's row block this warp's rows lie in
    const int m0 = blockIdx.z * BN;
    const T2 sym_zero = splat<T>(from_float<T>(Magic<T, BITS>::base + (float)(1 << (BITS - 1))));
    auto dequant = [&](int i, u32 (&a)[16]) {  // k-tile i's A registers: [unit][h][4]
        const int slot = i % STAGES;
        mbar_wait(&full[slot], (i / STAGES) & 1);
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const unsigned char* unit = smem + L::W_AT + slot * L::W + (2 * j + u) * L::UNIT;
            const int at = slot * L::S + (2 * j + u) * 64 + (g * 4 + 2 * rt) * 2;
            const u32 s = *reinterpret_cast<const u32*>(smem + L::S_AT + at);
            const u32 z = ASYM ? *reinterpret_cast<const u32*>(smem + L::Z_AT + at) : 0u;
            const RowParams<T, ASYM> p(s, z, sym_zero);
            if (BITS == 4) {  // the lane's words rt * 2 + h
                const uint2 q = *reinterpret_cast<const uint2*>(unit + (2 * lane + rt) * 8);
                Tile16<T>::dequant(q.x, a + 8 * u, p.z0, p.z1, p.s0, p.s1);
                Tile16<T>::dequant(q.y, a + 8 * u + 4, p.z0, p.z1, p.s0, p.s1);
            } else {  // part rt's 4 words h * 2 + hc
                const uint4 q = *reinterpret_cast<const uint4*>(unit + rt * 512 + lane * 16);
                Tile16x8<T>::dequant(q.x, q.y, a + 8 * u, p.z0, p.z1, p.s0, p.s1);
                Tile16x8<T>::dequant(q.z, q.w, a + 8 * u + 4, p.z0, p.z1, p.s0, p.s1);
            }
        }
    };

    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.0f;
    auto step = [&](int i, u32 (&cur)[16], u32 (&nxt)[16]) {
        mma_ktile_retire_previous<T, BN>(acc, cur, smem + (i % STAGES) * L::X);  // k-tile i - 1's registers
        //                                                                          (nxt) and slot are free
        if (i > 0 && lane == 0) mbar_arrive(&empty[(i - 1) % STAGES]);
        if (i + 1 < nkt) dequant(i + 1, nxt);
    };
    u32 a0[16], a1[16];
    if (nkt > 0) dequant(0, a0);
    for (int i = 0; i < nkt; i += 2) {
        step(i, a0, a1);
        if (i + 1 < nkt) step(i + 1, a1, a0);
    }
    wgmma_wait<0>();
    fence_acc<ACC>(acc);
    pdl_trigger();
    store_tile<T, BN, WGS>(acc, bias, y, ws, counters, M, N, ldy, m0);
}

#define WS_KERNEL(KIND, WGS, SUFFIX, T, BITS, ASYM, BN, STAGES, MINB)                                                   \
    extern "C" __global__ void __launch_bounds__(128 * WGS + 128, MINB)                                                 \
        int_weight_wgmma_##KIND##_##SUFFIX##_bn##BN##_s##STAGES(                                                         \
        const T* xt, const uint4* w, const T* scales, const T* zeros, const T* bias, T* y, float* ws, u32* counters,      \
        int M, int N, int RB, int KS, int ldy, int tr, int sshift, int sps, int kt_per_split) {                           \
        int_weight_wgmma_ws<T, BITS, ASYM, BN, STAGES, MINB, WGS>(xt, w, scales, zeros, bias, y, ws, counters, M, N, \
                                                                 RB, KS, ldy, tr, sshift, sps, kt_per_split);   \
    }
// Ring depth per token tile (quantkit.kernels.launch_int_weight_wgmma.STAGES) and blocks per multiprocessor:
// "ws" (two consumer warpgroups, 128 weight rows): two blocks for BN <= 64 (80 registers at entry), one
// for BN >= 128. ptxas (CUDA 13.0) compiles the consumers within what setmaxnreg grants at one block (BN = 256:
// no spills; 144 bytes spilled without it), but at two blocks it refused BN = 128's m64n128 wgmma at the
// 80-register entry bound (C7602).
// "ws4" (four consumer warpgroups, 256 weight rows, one block): each x tile serves twice the weight rows,
// which halves the x tiles read from L2 (at M = 64 on 28672 x 8192: 224 MB of x against 117 MB of weights
// with 128 rows a block). BN <= 64 only: at BN = 128 its 112 registers serialize the wgmmas (C7512).
#define WS_TILES(SUFFIX, T, BITS, ASYM, S64)                                                                   \
    WS_KERNEL(ws, 2, SUFFIX, T, BITS, ASYM, 32, 8, 2) WS_KERNEL(ws, 2, SUFFIX, T, BITS, ASYM, 64, S64, 2)              \
    WS_KERNEL(ws, 2, SUFFIX, T, BITS, ASYM, 128, 8, 1) WS_KERNEL(ws, 2, SUFFIX, T, BITS, ASYM, 256, 5, 1)              \
    WS_KERNEL(ws4, 4, SUFFIX, T, BITS, ASYM, 32, 8, 1) WS_KERNEL(ws4, 4, SUFFIX, T, BITS, ASYM, 64, 8, 1)

// 4-bit weights (BN = 64 of ws: 8 stages) and 8-bit ones (6, so that two blocks still fit)
WS_TILES(f16_b4_sym, __half, 4, false, 8)
WS_TILES(f16_b4_asym, __half, 4, true, 8)
WS_TILES(bf16_b4_sym, __nv_bfloat16, 4, false, 8)
WS_TILES(bf16_b4_asym, __nv_bfloat16, 4, true, 8)
WS_TILES(f16_b8_sym, __half, 8, false, 6)
WS_TILES(f16_b8_asym, __half, 8, true, 6)
WS_TILES(bf16_b8_sym, __nv_bfloat16, 8, false, 6)
WS_TILES(bf16_b8_asym, __nv_bfloat16, 8, true, 6)
