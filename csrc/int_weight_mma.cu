// y[M, N] = x[M, K] @ dequant(W)^T (+ bias), W of b-bit integers (b = 4 or 8) with
// one scale (and, asymmetric, one zero point) per group of K columns, x and y in
// float16 or bfloat16, float32 accumulation on the tensor cores (mma.sync m16n8k16).
//
// The product is computed transposed, y^T = W x^T: 16 weight rows are the mma's
// A operand (dequantized in registers straight from the packed words) and 8 tokens
// its B operand, so a decode step (M = 1..8) wastes no weight bandwidth.
//
// Three kernels:
//   int_weight_gemv_*  decode and small batches (NT = 1 or 2 tiles of 8 tokens):
//                      each warp streams steps of 4 column units straight into
//                      registers, D steps ahead; the scale multiplies the float32
//                      partial sum of a scale set (SPS sets per step) after the mma,
//                      so dequantization is only q - z, exact in half precision.
//   int_weight_mma_*   more tokens (NT = 1..8): a cp.async ring per warp, one unit
//                      per step, (q - z) * s rounded once in half precision.
//   int_weight_dequant_*  the dense [Np, Kp] weight for cuBLAS (large M).
//
// Weight layout (built at load time by quantkit.kernels.int_weight_layout.repack):
//   the weight, padded to Np = 32 * RB rows and Kp = 128 * NS columns (NS steps of
//   U = 4 units), is cut into units of 32 rows x 32 columns, unit (rb, ks) at
//   ((rb * KS + ks) * PARTS) uint4 * 32 lanes, KS = 4 NS, PARTS = BITS / 4.
//   Inside a unit the columns are permuted so that the mma B fragment of lane
//   l = 4 g + t is x[token g, 8 t .. 8 t + 7] of the unit, one 16-byte load:
//   fragment column 16 h + 8 hc + 2 t + c (tile half h, register half hc, element c)
//   is physical column 8 t + 4 h + 2 hc + c. The lane holds, for each of the unit's
//   four 16 x 16 mma tiles (rt = row half, h), the eight values an A fragment needs
//   (rows g and g + 8, fragment columns 2t, 2t + 1, 2t + 8, 2t + 9) as unsigned
//   u = q + 2^(b-1):
//     4-bit: word rt * 2 + h; nibble r + 4c is row g + 8 (r & 1), fragment column
//            2t + c + 8 (r >> 1)  -> (w >> 4r) & 0x000f000f is A register r.
//     8-bit: part rt, words h * 2 + hc; byte hr + 2c is row g + 8 hr, fragment
//            column 2t + c + 8 hc  -> (w >> 8 hr) & 0x00ff00ff is A register 2 hc + hr.
//   scales (and zeros): [RB, TR, SPS, 8, 4]: row (s >> sshift) of step s, set j of
//   the step (SPS = 1: one set for the step's 4 units; SPS = 4: one per unit),
//   entry [g, i] for weight row 32 rb + g + 8 i. A zero is stored as BASE + u_z
//   (u_z = z + 2^(b-1)), BASE the magic offset below, so (BASE + u) - (BASE + u_z)
//   = q - z exactly.
//
// K splits: blockIdx.y takes `steps_per_split` steps (gemv) or units (mma); when
// gridDim.y > 1 each block writes float32 partial sums to `ws` [S, M, Np] and the
// last block of a tile to finish (a counter per tile, reset by that block) adds the
// S partials in order and writes y: deterministic, one launch.
#include "int_weight_common.cuh"

// The warps' partial tiles summed (through `red`, >= W * 8 * 32 floats of shared
// memory) and written: y directly, or with K splits the float32 partials to ws and
// the last block of the tile adds them in split order.
template <typename T, int NT, int W>
__device__ void write_tile(float acc[2][NT][4], float* red_, const T* __restrict__ bias, T* __restrict__ y,
                           float* __restrict__ ws, u32* __restrict__ counters, int M, int N, int ldy, int rb, int m0) {
    float (*red)[8][32] = reinterpret_cast<float (*)[8][32]>(red_);  // [W][8][32]
    __shared__ u32 is_last;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int Np = gridDim.x * 32, splits = gridDim.y, split = blockIdx.y;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int rt = 0; rt < 2; ++rt)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[warp][rt * 4 + i][lane] = acc[rt][nt][i];
        __syncthreads();
        for (int item = threadIdx.x; item < 8 * 32; item += W * 32) {  // 8 accumulators x 32 lanes
            const int c = item >> 5, ln = item & 31;
            float v = 0.0f;
#pragma unroll
            for (int wi = 0; wi < W; ++wi) v += red[wi][c][ln];
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

    __threadfence();
    __syncthreads();
    u32* counter = counters + (size_t)blockIdx.z * gridDim.x + rb;
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

// x chunk of one lane for one unit: x[row, col .. col + 7] (16 bytes), zero past M or K.
__device__ __forceinline__ uint4 load_x(const void* row_base, bool row_ok, int col, int K, int elem_bytes) {
    if (row_ok && col < K) return __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(row_base) + (size_t)col * elem_bytes));
    return make_uint4(0u, 0u, 0u, 0u);
}

// ---- decode kernel ---------------------------------------------------------------------------
// Stream-K over warps: the RB * NS steps (row block rb, step s; a step is 4 units, 128
// columns) form one sequence in memory order, and warp `wid` of the persistent grid
// takes the contiguous run [wid * per, (wid + 1) * per): its weights are one
// contiguous stream, loaded D steps ahead into registers. Every warp is busy from
// launch to end (no waves, no block-wide barriers); a run may cross row blocks.
// Per scale set (SPS per step) the tensor cores sum (q - z) x in float32 and the
// float32 scale multiplies that sum (EPI; EPI = false applies it while dequantizing).
// A row block's partial sums from the `count` warps whose runs touch it go to ws
// [RB, cmax, M, 32] and the last of them to finish (a counter per row block) adds
// them in warp order: deterministic. A row block inside one run is written directly.
// One warp's share of row block rb is in ws; the last of the `count` warps to arrive
// adds the shares in warp order and writes y (out of line: the decode loop stays small).
template <typename T>
__device__ __noinline__ void add_partials(float* ws, u32* counters, const T* bias, T* y, int rb, int count, int cmax,
                                          int M, int N, int ldy) {
    const int lane = threadIdx.x & 31;
    __threadfence();
    u32 ticket = 0;
    if (lane == 0) ticket = atomicAdd(counters + rb, 1u);
    ticket = __shfl_sync(0xffffffffu, ticket, 0);
    if (ticket != (u32)(count - 1)) return;
    __threadfence();
    if (lane == 0) counters[rb] = 0u;
    const int n = rb * 32 + lane;
    if (n >= N) return;
    for (int m = 0; m < M; ++m) {
        float v = 0.0f;
        for (int c = 0; c < count; ++c) v += __ldcg(ws + (((size_t)rb * cmax + c) * M + m) * 32 + lane);
        y[(size_t)m * ldy + n] = from_float<T>(bias != nullptr ? v + to_float<T>(bias[n]) : v);
    }
}

// NORM (one token, M = 1): x is first put through the residual add and RMSNorm, as add_rms_norm
// in engine_ops.cu computes it (h = T(x + res); out = T(nw * T(h * rsqrt(mean(h^2) + eps)))), by
// every block into its shared memory (K <= 12288), and block 0 writes h to h_out (the next
// residual; not when res is null). The norm's own kernel, and its launch and memory round trip
// between two layers' linears, are gone. A thread takes chunks of 8 elements, NORM_CHUNKS at a
// time with all their loads in flight (a dependent round trip per chunk would cost more than the
// norm kernel it replaces).
constexpr int NORM_CHUNKS = 4;
template <typename T>
__device__ void norm_prologue(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ nw, float eps,
                              T* __restrict__ h_out, int K, int Kp, T* xs) {
    __shared__ float part[32];
    const int stride = blockDim.x * 8;
    float ss = 0.0f;
    for (int base = threadIdx.x * 8; base < Kp; base += NORM_CHUNKS * stride) {
        uint4 hv[NORM_CHUNKS], rv[NORM_CHUNKS];
#pragma unroll
        for (int c = 0; c < NORM_CHUNKS; ++c) {
            const int i = base + c * stride;
            hv[c] = rv[c] = make_uint4(0u, 0u, 0u, 0u);
            if (i < K) {
                hv[c] = *reinterpret_cast<const uint4*>(x + i);
                if (res != nullptr) rv[c] = *reinterpret_cast<const uint4*>(res + i);
            }
        }
#pragma unroll
        for (int c = 0; c < NORM_CHUNKS; ++c) {
            const int i = base + c * stride;
            if (i >= Kp) break;
            T* h = reinterpret_cast<T*>(&hv[c]);
            const T* r = reinterpret_cast<const T*>(&rv[c]);
            if (res != nullptr) {
#pragma unroll
                for (int e = 0; e < 8; ++e) h[e] = from_float<T>(to_float<T>(h[e]) + to_float<T>(r[e]));
                if (blockIdx.x == 0 && i < K) *reinterpret_cast<uint4*>(h_out + i) = hv[c];
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) ss += to_float<T>(h[e]) * to_float<T>(h[e]);
            *reinterpret_cast<uint4*>(xs + i) = hv[c];
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    ss = 0.0f;
    for (int wi = 0; wi < (int)(blockDim.x >> 5); ++wi) ss += part[wi];
    const float inv = rsqrtf(ss / K + eps);
    for (int base = threadIdx.x * 8; base < K; base += NORM_CHUNKS * stride) {
        uint4 wv[NORM_CHUNKS];
#pragma unroll
        for (int c = 0; c < NORM_CHUNKS; ++c)
            if (base + c * stride < K) wv[c] = __ldg(reinterpret_cast<const uint4*>(nw + base + c * stride));
#pragma unroll
        for (int c = 0; c < NORM_CHUNKS; ++c) {
            const int i = base + c * stride;
            if (i >= K) break;
            uint4 hv = *reinterpret_cast<const uint4*>(xs + i);
            T* h = reinterpret_cast<T*>(&hv);
            const T* wn = reinterpret_cast<const T*>(&wv[c]);
#pragma unroll
            for (int e = 0; e < 8; ++e)
                h[e] = from_float<T>(to_float<T>(wn[e]) * to_float<T>(from_float<T>(to_float<T>(h[e]) * inv)));
            *reinterpret_cast<uint4*>(xs + i) = hv;
        }
    }
    __syncthreads();
}

template <typename T, int BITS, int NT, bool ASYM, int SPS, bool EPI, int D, int W, bool XP, bool RBK, bool NORM>
__device__ void int_weight_gemv(const T* __restrict__ x, const uint4* __restrict__ w, const T* __restrict__ scales,
                                const T* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
                                float* __restrict__ ws, u32* __restrict__ counters, int M, int N, int K, int NS, int RB,
                                int ldx, int ldy, int tr, int sshift, int per, int cmax, const T* __restrict__ res,
                                const T* __restrict__ nw, float eps, T* __restrict__ h_out) {
    extern __shared__ uint4 dyn_smem[];  // NORM: the normalized x, NS * 128 elements
    T* xs = reinterpret_cast<T*>(dyn_smem);
    typedef typename Pair<T>::type T2;
    constexpr int PARTS = BITS / 4;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int wid = blockIdx.x * W + (threadIdx.x >> 5);
    // RBK: block b takes row block b, its warps `per` steps each; else the stream-K run of warp wid
    const int begin = RBK ? blockIdx.x * NS + (threadIdx.x >> 5) * per : wid * per;
    const int end = RBK ? min((blockIdx.x + 1) * NS, begin + per) : min(RB * NS, begin + per);
    pdl_trigger();
    if (!RBK && !NORM && begin >= end) return;  // (RBK, NORM: every warp takes part in block-wide steps)

    const T* xr[NT];
    bool xok[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int m = nt * 8 + g;
        xok[nt] = m < M;
        xr[nt] = x + (size_t)(xok[nt] ? m : 0) * ldx;
    }
    const T sym_zero = from_float<T>(Magic<T, BITS>::base + (float)(1 << (BITS - 1)));

    struct Buf {
        uint4 q[U][PARTS];
        uint4 xv[XP ? NT : 1][U];  // XP: x loaded with the weights, else when the step is computed
        uint2 sc[SPS], zp[SPS];
        int rb, s;
    };
    auto load_xs = [&](uint4 (*xv)[U], int s) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int u = 0; u < U; ++u)
                xv[nt][u] = !NORM ? load_x(xr[nt], xok[nt], s * 128 + u * 32 + 8 * t, K, sizeof(T))
                          : xok[nt] ? *reinterpret_cast<const uint4*>(xs + s * 128 + u * 32 + 8 * t)
                                    : make_uint4(0u, 0u, 0u, 0u);
    };
    // The load cursor walks the run in order: step (lrb, ls) at wp.
    int lrb = begin / NS, ls = begin - lrb * NS;
    const uint4* wp = w + (size_t)begin * U * PARTS * 32 + lane;
    auto load = [&](Buf& b) {
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int pt = 0; pt < PARTS; ++pt) b.q[u][pt] = load_stream(wp + (u * PARTS + pt) * 32);
        if (XP) load_xs(b.xv, ls);
        const size_t sidx = ((size_t)lrb * tr + (ls >> sshift)) * SPS * 32 + g * 4;
#pragma unroll
        for (int j = 0; j < SPS; ++j) {
            b.sc[j] = __ldg(reinterpret_cast<const uint2*>(scales + sidx + j * 32));
            if (ASYM) b.zp[j] = __ldg(reinterpret_cast<const uint2*>(zeros + sidx + j * 32));
        }
        b.rb = lrb;
        b.s = ls;
        wp += U * PARTS * 32;
        if (++ls == NS) {
            ls = 0;
            ++lrb;
        }
    };

    float acc[2][NT][4];
    zero_tiles<NT>(acc);

    auto compute = [&](const Buf& b) {
        uint4 xs[NT][U];
        if (XP) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int u = 0; u < U; ++u) xs[nt][u] = b.xv[XP ? nt : 0][u];
        } else {
            load_xs(xs, b.s);
        }
        float part[2][NT][4];
        T2 z2[4], s2[4];
        float sf[4];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = SPS == 1 ? 0 : u;
            if (u == 0 || SPS > 1) {
                const T* s4 = reinterpret_cast<const T*>(&b.sc[j]);
                const T* z4 = reinterpret_cast<const T*>(&b.zp[j]);
                lane_pairs<T, ASYM>(s4, z4, sym_zero, s2, z2);
#pragma unroll
                for (int i = 0; i < 4; ++i) sf[i] = to_float<T>(s4[i]);
                zero_tiles<NT>(part);
            }
            u32 a[2][2][4];
            Unit<T, BITS, !EPI>::dequant(b.q[u], a, z2, s2);
            float (*c)[NT][4] = EPI ? part : acc;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mma_unit<T>(c[0][nt], c[1][nt], a, xs[nt][u]);
            if (EPI && (u == U - 1 || SPS > 1)) {
#pragma unroll
                for (int rt = 0; rt < 2; ++rt)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int i = 0; i < 4; ++i) acc[rt][nt][i] = fmaf(sf[2 * rt + (i >> 1)], part[rt][nt][i], acc[rt][nt][i]);
            }
        }
    };

    // acc holds this warp's part of row block rb: write it (alone) or add it through ws.
    auto flush = [&](int rb) {
        const int first = rb * NS / per, count = ((rb + 1) * NS - 1) / per - first + 1;
#pragma unroll
        for (int rt = 0; rt < 2; ++rt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int m = nt * 8 + 2 * t + (i & 1), r = rt * 16 + g + 8 * (i >> 1), n = rb * 32 + r;
                    if (m >= M) continue;
                    if (count > 1) {
                        ws[(((size_t)rb * cmax + wid - first) * M + m) * 32 + r] = acc[rt][nt][i];
                    } else if (n < N) {
                        const float v = acc[rt][nt][i];
                        y[(size_t)m * ldy + n] = from_float<T>(bias != nullptr ? v + to_float<T>(bias[n]) : v);
                    }
                }
        if (count > 1) add_partials(ws, counters, bias, y, rb, count, cmax, M, N, ldy);
    };

    const int n = max(0, end - begin);
    Buf buf[D];
    if (XP) pdl_wait();
#pragma unroll
    for (int d = 0; d < D; ++d)
        if (d < n) load(buf[d]);
    // Launched early (PDL), the first D steps of weights and scales stream in while the previous
    // kernel finishes: they are the layer's own, written before any kernel that could still run.
    if (!XP) pdl_wait();
    if (NORM) norm_prologue<T>(x, res, nw, eps, h_out, K, NS * 128, xs);
    int rb = RBK ? (int)blockIdx.x : begin / NS;
    for (int i = 0; i < n; i += D) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
            if (i + d < n) {
                if (buf[d].rb != rb) {
                    flush(rb);
                    zero_tiles<NT>(acc);
                    rb = buf[d].rb;
                }
                compute(buf[d]);
                if (i + d + D < n) load(buf[d]);
            }
        }
    }
    if (RBK) {  // the block's W partial sums of its row block, added in warp order through shared memory
        __shared__ float red[W * 8 * 32];
        write_tile<T, NT, W>(acc, red, bias, y, ws, counters, M, N, ldy, rb, 0);
    } else if (n > 0) {  // (NORM: a warp past the end stayed for the prologue's barriers)
        flush(rb);
    }
}

// ---- batch kernel ----------------------------------------------------------------------------
// Pipeline depth: each warp streams its own column units through a ring of STAGES
// slots (weights, scales, zeros of one unit), STAGES - 1 of them in flight.
template <int BITS, bool ASYM> struct Ring {
    static constexpr int PARTS = BITS / 4;
    static constexpr int LANE_BYTES = 16 * PARTS + 8 + (ASYM ? 8 : 0);
    static constexpr int STAGES = SMEM_BUDGET / (WARPS * 32 * LANE_BYTES) < 8 ? SMEM_BUDGET / (WARPS * 32 * LANE_BYTES) : 8;
    static constexpr int BYTES = WARPS * STAGES * 32 * LANE_BYTES;
};

// x rows are read in place (16 bytes per lane and unit, see the layout above).
template <typename T, int BITS, int NT, bool ASYM>
__device__ void int_weight_mma(const T* __restrict__ x, const uint4* __restrict__ w, const T* __restrict__ scales,
                               const T* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
                               float* __restrict__ ws, u32* __restrict__ counters, int M, int N, int K, int NS, int ldx,
                               int ldy, int tr, int sshift, int sps, int steps_per_split) {
    typedef typename Pair<T>::type T2;
    typedef Ring<BITS, ASYM> R;
    constexpr int PARTS = R::PARTS, STAGES = R::STAGES;
    const int KS = NS * U;
    const int rb = blockIdx.x, split = blockIdx.y, m0 = blockIdx.z * NT * 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k_begin = split * steps_per_split, k_end = min(KS, k_begin + steps_per_split);

    extern __shared__ uint4 smem[];
    uint4* wring = smem + warp * STAGES * PARTS * 32;                                    // [STAGES][PARTS][32]
    uint2* sring = reinterpret_cast<uint2*>(smem + WARPS * STAGES * PARTS * 32) + warp * STAGES * 32;  // [STAGES][32]
    uint2* zring = sring + WARPS * STAGES * 32;

    const T* xr[NT];
    bool xok[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int m = m0 + nt * 8 + g;
        xok[nt] = m < M;
        xr[nt] = x + (size_t)(xok[nt] ? m : 0) * ldx;
    }
    const uint4* wp = w + (size_t)rb * KS * PARTS * 32 + lane;
    const size_t trow = (size_t)rb * tr * sps * 32 + g * 4;
    const T sym_zero = from_float<T>(Magic<T, BITS>::base + (float)(1 << (BITS - 1)));

    const int first = k_begin + warp;
    const int steps = first < k_end ? (k_end - first + WARPS - 1) / WARPS : 0;
    auto issue = [&](int i) {
        if (i < steps) {
            const int ks = first + i * WARPS, slot = i % STAGES;
#pragma unroll
            for (int p = 0; p < PARTS; ++p) cp_async16(&wring[(slot * PARTS + p) * 32 + lane], wp + ((size_t)ks * PARTS + p) * 32);
            const size_t sidx = trow + ((size_t)((ks >> 2) >> sshift) * sps + ((ks & 3) & (sps - 1))) * 32;
            cp_async8(&sring[slot * 32 + lane], scales + sidx);
            if (ASYM) cp_async8(&zring[slot * 32 + lane], zeros + sidx);
        }
        cp_async_commit();  // an empty group keeps the wait count uniform
    };

    float acc[2][NT][4];
    zero_tiles<NT>(acc);

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s);
    for (int i = 0; i < steps; ++i) {
        issue(i + STAGES - 1);
        const int ks = first + i * WARPS, slot = i % STAGES;
        uint4 xv[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xv[nt] = load_x(xr[nt], xok[nt], ks * 32 + 8 * t, K, sizeof(T));
        cp_async_wait<STAGES - 1>();  // this lane's copies of step i have landed (each lane reads only its own)
        uint4 q[PARTS];
#pragma unroll
        for (int p = 0; p < PARTS; ++p) q[p] = wring[(slot * PARTS + p) * 32 + lane];
        const uint2 sc = sring[slot * 32 + lane];
        const uint2 zp = ASYM ? zring[slot * 32 + lane] : make_uint2(0u, 0u);
        const T* s4 = reinterpret_cast<const T*>(&sc);
        const T* z4 = reinterpret_cast<const T*>(&zp);
        T2 z2[4], s2[4];
        lane_pairs<T, ASYM>(s4, z4, sym_zero, s2, z2);
        u32 a[2][2][4];
        Unit<T, BITS, true>::dequant(q, a, z2, s2);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_unit<T>(acc[0][nt], acc[1][nt], a, xv[nt]);
    }
    cp_async_wait<0>();
    __syncthreads();  // the ring is reused below
    write_tile<T, NT, WARPS>(acc, reinterpret_cast<float*>(smem), bias, y, ws, counters, M, N, ldy, rb, m0);
}

// W dequantized to a dense T [Np, Kp] (row stride Kp): one warp per 32 x 32 unit,
// staged through shared memory so that each row goes out in 16-byte stores.
template <typename T, int BITS, bool ASYM>
__device__ void int_weight_dequant(const uint4* __restrict__ w, const T* __restrict__ scales,
                                   const T* __restrict__ zeros, T* __restrict__ out, int RB, int NS, int tr, int sshift,
                                   int sps) {
    typedef typename Pair<T>::type T2;
    constexpr int PARTS = BITS / 4, ROW = 20;  // u32 per staged row: 16 + 4 of padding (banks)
    __shared__ __align__(16) u32 tile[WARPS][32 * ROW];
    const int KS = NS * U;
    const int warp = threadIdx.x >> 5;
    const size_t unit = (size_t)blockIdx.x * WARPS + warp;
    if (unit >= (size_t)RB * KS) return;
    const int rb = unit / KS, ks = unit % KS, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    uint4 q[PARTS];
#pragma unroll
    for (int p = 0; p < PARTS; ++p) q[p] = load_stream(w + (unit * PARTS + p) * 32 + lane);
    const size_t sidx = (size_t)rb * tr * sps * 32 + g * 4 + ((size_t)((ks >> 2) >> sshift) * sps + ((ks & 3) & (sps - 1))) * 32;
    const T sym_zero = from_float<T>(Magic<T, BITS>::base + (float)(1 << (BITS - 1)));
    T2 z2[4], s2[4];
    lane_pairs<T, ASYM>(scales + sidx, ASYM ? zeros + sidx : nullptr, sym_zero, s2, z2);
    u32 a[2][2][4];
    Unit<T, BITS, true>::dequant(q, a, z2, s2);
    u32* my = tile[warp];
#pragma unroll
    for (int rt = 0; rt < 2; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int r = 0; r < 4; ++r)  // rows g + 8 (r & 1), physical column pair 4 t + 2 h + (r >> 1)
                my[(rt * 16 + g + 8 * (r & 1)) * ROW + 4 * t + 2 * h + (r >> 1)] = a[rt][h][r];
    __syncwarp();
    const size_t Kp = (size_t)KS * 32;
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int c = it * 32 + lane, row = c >> 2, part = c & 3;  // 4 lanes cover one 64-byte row
        *reinterpret_cast<uint4*>(out + ((size_t)rb * 32 + row) * Kp + (size_t)ks * 32 + part * 8) =
            *reinterpret_cast<const uint4*>(&my[row * ROW + part * 4]);
    }
}

#define GEMV_KERNEL_N(SUFFIX, T, BITS, ASYM, NT, SPS, EPI, D, W, XP, MB, RBK, NORM)                                  \
    extern "C" __global__ void __launch_bounds__(W * 32, MB)                                                        \
        int_weight_gemv_##SUFFIX##_nt##NT##_s##SPS##_e##EPI##_d##D##_w##W##_x##XP##_b##MB##_r##RBK##_n##NORM(       \
            const T* x, const uint4* w, const T* scales, const T* zeros, const T* bias, T* y, float* ws,            \
            u32* counters, int M, int N, int K, int NS, int RB, int ldx, int ldy, int tr, int sshift, int per,      \
            int cmax, const T* res, const T* nw, float eps, T* h_out) {                                             \
        int_weight_gemv<T, BITS, NT, ASYM, SPS, EPI, D, W, XP, RBK, NORM>(x, w, scales, zeros, bias, y, ws,         \
                                                                          counters, M, N, K, NS, RB, ldx, ldy, tr,  \
                                                                          sshift, per, cmax, res, nw, eps, h_out);  \
    }
#define GEMV_KERNEL(SUFFIX, T, BITS, ASYM, NT, SPS, EPI, D, W, XP, MB, RBK) \
    GEMV_KERNEL_N(SUFFIX, T, BITS, ASYM, NT, SPS, EPI, D, W, XP, MB, RBK, 0)
// The production decode kernels (quantkit.kernels.int_weight_cuda.GEMV and _gemv_variant pick them). Every format
// and both scale-set layouts get the stream-K kernel for 1-8 and 9-16 tokens.
#define GEMV_BASE(SUFFIX, T, BITS, ASYM, SPS)                         \
    GEMV_KERNEL(SUFFIX, T, BITS, ASYM, 1, SPS, 1, 2, 8, 0, 2, 0)      \
    GEMV_KERNEL(SUFFIX, T, BITS, ASYM, 2, SPS, 1, 2, 8, 0, 2, 0)
// 4-bit formats with one scale set per step (groups of 128 columns or more) also get the row-block variants and
// the fused-RMSNorm kernels the engine uses at batch 1; instantiating them for every format and layout made the
// module three times as long to compile.
#define GEMV_ENGINE(SUFFIX, T, BITS, ASYM)                                \
    GEMV_KERNEL_N(SUFFIX, T, BITS, ASYM, 1, 1, 1, 2, 4, 0, 4, 1, 0)     \
    GEMV_KERNEL_N(SUFFIX, T, BITS, ASYM, 1, 1, 1, 2, 8, 0, 2, 1, 0)     \
    GEMV_KERNEL_N(SUFFIX, T, BITS, ASYM, 1, 1, 1, 2, 16, 0, 1, 1, 0)    \
    GEMV_KERNEL_N(SUFFIX, T, BITS, ASYM, 1, 1, 1, 2, 8, 0, 2, 0, 1)     \
    GEMV_KERNEL_N(SUFFIX, T, BITS, ASYM, 1, 1, 1, 2, 4, 0, 4, 1, 1)     \
    GEMV_KERNEL_N(SUFFIX, T, BITS, ASYM, 1, 1, 1, 2, 8, 0, 2, 1, 1)     \
    GEMV_KERNEL_N(SUFFIX, T, BITS, ASYM, 1, 1, 1, 2, 16, 0, 1, 1, 1)

#define MMA_KERNEL(NAME, T, BITS, NT, ASYM)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                                            \
        const T* x, const uint4* w, const T* scales, const T* zeros, const T* bias, T* y, float* ws, u32* counters,    \
        int M, int N, int K, int NS, int ldx, int ldy, int tr, int sshift, int sps, int steps_per_split) {             \
        int_weight_mma<T, BITS, NT, ASYM>(x, w, scales, zeros, bias, y, ws, counters, M, N, K, NS, ldx, ldy, tr,       \
                                          sshift, sps, steps_per_split);                                               \
    }
#define MMA_NTS(SUFFIX, T, BITS, ASYM)                                   \
    MMA_KERNEL(int_weight_mma_##SUFFIX##_nt1, T, BITS, 1, ASYM)          \
    MMA_KERNEL(int_weight_mma_##SUFFIX##_nt2, T, BITS, 2, ASYM)          \
    MMA_KERNEL(int_weight_mma_##SUFFIX##_nt4, T, BITS, 4, ASYM)          \
    MMA_KERNEL(int_weight_mma_##SUFFIX##_nt8, T, BITS, 8, ASYM)
#define DEQUANT_KERNEL(SUFFIX, T, BITS, ASYM)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) int_weight_dequant_##SUFFIX(                                \
        const uint4* w, const T* scales, const T* zeros, T* out, int RB, int NS, int tr, int sshift, int sps) {   \
        int_weight_dequant<T, BITS, ASYM>(w, scales, zeros, out, RB, NS, tr, sshift, sps);                        \
    }
#define ALL(SUFFIX, T, BITS, ASYM)                                                     \
    GEMV_BASE(SUFFIX, T, BITS, ASYM, 1) GEMV_BASE(SUFFIX, T, BITS, ASYM, 4)             \
    MMA_NTS(SUFFIX, T, BITS, ASYM) DEQUANT_KERNEL(SUFFIX, T, BITS, ASYM)

ALL(f16_b4_sym, __half, 4, false) GEMV_ENGINE(f16_b4_sym, __half, 4, false)
ALL(f16_b4_asym, __half, 4, true) GEMV_ENGINE(f16_b4_asym, __half, 4, true)
ALL(f16_b8_sym, __half, 8, false)
ALL(f16_b8_asym, __half, 8, true)
ALL(bf16_b4_sym, __nv_bfloat16, 4, false) GEMV_ENGINE(bf16_b4_sym, __nv_bfloat16, 4, false)
ALL(bf16_b4_asym, __nv_bfloat16, 4, true) GEMV_ENGINE(bf16_b4_asym, __nv_bfloat16, 4, true)
ALL(bf16_b8_sym, __nv_bfloat16, 8, false)
ALL(bf16_b8_asym, __nv_bfloat16, 8, true)

// Variants of the decode kernel kept for scripts/profile_int_weight.py (fp16, 4-bit, symmetric; csrc/NOTES.md has their timings).
GEMV_KERNEL(f16_b4_sym, __half, 4, false, 1, 1, 1, 2, 8, 1, 1, 0)
GEMV_KERNEL(f16_b4_sym, __half, 4, false, 1, 1, 1, 3, 8, 0, 2, 0)
