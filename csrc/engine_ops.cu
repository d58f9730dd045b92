// The engine's small per-layer ops, fused: a decode step of a 7B model at batch 1 is ~40 tiny
// torch kernels per layer besides the linears, and their launch and memory round trips cost
// more than the linears themselves. Each kernel reproduces the roundings of the transformers
// Llama code it replaces (values rounded to T where that code rounds), so that the torch twins
// in quantkit/kernels/engine_ops.py agree to the last bit up to the order of float sums.
//
//   add_rms_norm   h = x (+ r), rounded to T; out = w * T(h * rsqrt(mean(h^2) + eps))
//   silu_mul       out = T(T(silu(g)) * u)
//   rope_cache     q' = T(T(q cos) + T(rot(q) sin)), same for k; k', v written to cache slots
//                  (the _kv8 kernels: a cache of FP8 E4M3, k' and v rounded to it, saturating)
//   paged_attention  out[r, h] = softmax(q k^T * scale) v over the keys 0 .. pos[r] of row r's
//                  sequence, read through its slot list (the paged KV cache, of T or, _kv8, FP8
//                  E4M3 read exactly into float); GQA by head groups.
// and for the families beyond Llama (Gemma's roundings where Gemma's code differs from Llama's):
//   add_rms_norm_offset  out = T(h * rsqrt(mean(h^2) + eps) * (offset + w)), all in float (Gemma)
//   gelu_tanh_mul  out = T(T(gelu_tanh(g)) * u)
//   qk_rms_norm    q, k: RMSNorm over each head (Llama's or Gemma's rounding), v copied, into one
//                  [rows, (Hq + 2 Hk) D] buffer
//   paged_attention_window  paged_attention over the keys pos[r] - window + 1 .. pos[r] only (window
//                  0: all), with scores soft-capped, softcap * tanh(s / softcap) (softcap 0: none)
// and, in front of a W8A8 linear, the ops that write its input quantized per token (Q: int8 or FP8
// E4M3), so that the linear's own quantization kernel (csrc/quantize_rows.cu) does not run:
//   add_rms_norm_quant  add_rms_norm's out (either rounding), quantized: q = Q(out / s), s per row
//   silu_mul_quant      silu_mul's out, quantized the same way
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

template <typename T> __device__ __forceinline__ float f(T v);
template <> __device__ __forceinline__ float f<float>(float v) { return v; }
template <> __device__ __forceinline__ float f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float f<__nv_fp8_e4m3>(__nv_fp8_e4m3 v) { return float(v); }
template <typename T> __device__ __forceinline__ T to(float v);
template <> __device__ __forceinline__ float to<float>(float v) { return v; }
template <> __device__ __forceinline__ __half to<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 to<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
// an FP8 KV cache's entries: round to nearest even, saturating at +-448 (as torch's cast)
template <> __device__ __forceinline__ __nv_fp8_e4m3 to<__nv_fp8_e4m3>(float v) { return __nv_fp8_e4m3(v); }
template <typename T> __device__ __forceinline__ float r(float v) { return f<T>(to<T>(v)); }  // round through T

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }  // NVRTC has no INFINITY

// Programmatic dependent launch (quantkit.kernels.cuda.launch(dependent=True)): every kernel here
// lets the next one launch at once and waits for the previous one before touching memory.
__device__ __forceinline__ void pdl_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One block of 1024 threads per row, H <= 8192: every element is loaded into registers up front
// (one memory latency, not H / blockDim of them). x, r, r_out rows of H with row strides; r may be
// null (first layer). y: the thread's elements i = threadIdx.x + e * NORM_THREADS of the normalized
// row, each rounded to T (0 past H).
// OFFSET: Gemma's norm, (h / rms) * (offset + w) in float and rounded once; else Llama's, w * T(h / rms).
constexpr int NORM_THREADS = 1024, NORM_MAXE = 8;
template <typename T, bool OFFSET>
__device__ __forceinline__ void norm_row(const T* x, int ldx, const T* res, int ldr, const T* w, float eps,
                                         float offset, T* res_out, int ldro, int H, float (&y)[NORM_MAXE]) {
    __shared__ float part[32];
    const int row = blockIdx.x;
    x += (size_t)row * ldx;
#pragma unroll
    for (int e = 0; e < NORM_MAXE; ++e) {
        const int i = threadIdx.x + e * NORM_THREADS;
        y[e] = i < H ? f<T>(x[i]) : 0.0f;
        if (res != nullptr && i < H) y[e] = r<T>(y[e] + f<T>(res[(size_t)row * ldr + i]));
    }
    float ss = 0.0f;
#pragma unroll
    for (int e = 0; e < NORM_MAXE; ++e) {
        const int i = threadIdx.x + e * NORM_THREADS;
        if (i < H && res != nullptr) res_out[(size_t)row * ldro + i] = to<T>(y[e]);
        ss += y[e] * y[e];
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = part[threadIdx.x];
        v = warp_sum(v);
        if (threadIdx.x == 0) part[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(part[0] / H + eps);
#pragma unroll
    for (int e = 0; e < NORM_MAXE; ++e) {
        const int i = threadIdx.x + e * NORM_THREADS;
        if (i >= H) continue;
        if constexpr (OFFSET) {
            y[e] = r<T>(y[e] * inv * (offset + f<T>(w[i])));
        } else {
            y[e] = r<T>(f<T>(w[i]) * r<T>(y[e] * inv));
        }
    }
}

template <typename T, bool OFFSET>
__device__ void add_rms_norm(const T* x, int ldx, const T* res, int ldr, const T* w, float eps, float offset, T* out,
                             int ldo, T* res_out, int ldro, int H) {
    pdl_start();
    float y[NORM_MAXE];
    norm_row<T, OFFSET>(x, ldx, res, ldr, w, eps, offset, res_out, ldro, H, y);
    out += (size_t)blockIdx.x * ldo;
#pragma unroll
    for (int e = 0; e < NORM_MAXE; ++e) {
        const int i = threadIdx.x + e * NORM_THREADS;
        if (i < H) out[i] = to<T>(y[e]);
    }
}

// out[t, i] = T(T(silu(g)) * u), g and u rows with their own strides (views of one gate_up output).
template <typename T>
__device__ void silu_mul(const T* g, const T* u, int ld_in, T* out, int I, int rows) {
    pdl_start();
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)rows * I) return;
    const size_t t = idx / I, i = idx % I;
    const float gv = f<T>(g[t * ld_in + i]);
    const float s = r<T>(gv / (1.0f + expf(-gv)));  // expf, not __expf: the same value torch computes
    out[idx] = to<T>(s * f<T>(u[t * ld_in + i]));
}

// out[t, i] = T(T(gelu_tanh(g)) * u): torch's CUDA gelu(approximate="tanh") formula, in float.
template <typename T>
__device__ void gelu_tanh_mul(const T* g, const T* u, int ld_in, T* out, int I, int rows) {
    pdl_start();
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)rows * I) return;
    const size_t t = idx / I, i = idx % I;
    const float x = f<T>(g[t * ld_in + i]);
    const float beta = 0.7978845608028654f, kappa = 0.044715f;  // sqrt(2 / pi)
    const float s = r<T>(0.5f * x * (1.0f + tanhf(beta * (x + kappa * (x * x * x)))));
    out[idx] = to<T>(s * f<T>(u[t * ld_in + i]));
}

// One warp per (token, head) of q (heads < Hq), k (the next Hk) and v (the last Hk), D <= 256 (8
// elements per lane): q and k heads are normalized over D with their weight (offset 0: Llama's
// rounding, w * T(x / rms); else Gemma's, T(x / rms * (offset + w))), v heads copied; all into out
// [rows, Hq + 2 Hk, D] contiguous, the layout rope_cache reads with one row stride.
template <typename T>
__device__ void qk_rms_norm(const T* q, int ldq, const T* k, int ldk, const T* v, int ldv, const T* qw, const T* kw,
                            float eps, float offset, T* out, int rows, int Hq, int Hk, int D) {
    pdl_start();
    const int heads = Hq + 2 * Hk, lane = threadIdx.x & 31;
    const size_t item = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;  // the same for a whole warp
    if (item >= (size_t)rows * heads) return;
    const size_t t = item / heads;
    const int h = item % heads;
    const T* src;
    const T* w = nullptr;
    if (h < Hq) {
        src = q + t * ldq + (size_t)h * D;
        w = qw;
    } else if (h < Hq + Hk) {
        src = k + t * ldk + (size_t)(h - Hq) * D;
        w = kw;
    } else {
        src = v + t * ldv + (size_t)(h - Hq - Hk) * D;
    }
    T* dst = out + item * D;
    float x[8];
    float ss = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const int d = lane + 32 * e;
        x[e] = d < D ? f<T>(src[d]) : 0.0f;
        ss += x[e] * x[e];
    }
    if (w == nullptr) {  // a v head
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (lane + 32 * e < D) dst[lane + 32 * e] = src[lane + 32 * e];
        return;
    }
    const float inv = rsqrtf(warp_sum(ss) / D + eps);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const int d = lane + 32 * e;
        if (d >= D) continue;
        dst[d] = offset != 0.0f ? to<T>(x[e] * inv * (offset + f<T>(w[d]))) : to<T>(f<T>(w[d]) * r<T>(x[e] * inv));
    }
}

// One thread per (token, head, i < D / 2): rotates the pair (i, i + D / 2) of q (heads < Hq) or k
// (the next Hk heads), writes q' to q_out [T, Hq, D], k' and v to the cache (of C: T, or FP8) at the
// token's slot.
template <typename T, typename C>
__device__ void rope_cache(const T* q, const T* k, const T* v, int ld_in, const T* cos, const T* sin, int ld_cs,
                           const long long* slots, T* q_out, C* kc, C* vc, int rows, int Hq, int Hk, int D) {
    pdl_start();
    const int half = D / 2;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)rows * (Hq + Hk) * half) return;
    const int i = idx % half, head = (idx / half) % (Hq + Hk);
    const size_t t = idx / half / (Hq + Hk);
    const bool is_q = head < Hq;
    const int hh = is_q ? head : head - Hq;
    const T* src = (is_q ? q : k) + t * ld_in + (size_t)hh * D;
    const float a = f<T>(src[i]), b = f<T>(src[i + half]);
    const float c0 = f<T>(cos[t * ld_cs + i]), c1 = f<T>(cos[t * ld_cs + i + half]);
    const float s0 = f<T>(sin[t * ld_cs + i]), s1 = f<T>(sin[t * ld_cs + i + half]);
    const T lo = to<T>(r<T>(a * c0) + r<T>(-b * s0));  // rotate_half: (-x2, x1)
    const T hi = to<T>(r<T>(b * c1) + r<T>(a * s1));
    if (is_q) {
        T* o = q_out + (t * Hq + hh) * D;
        o[i] = lo;
        o[i + half] = hi;
    } else {
        const size_t base = ((size_t)slots[t] * Hk + hh) * D;
        kc[base + i] = to<C>(f<T>(lo));
        kc[base + i + half] = to<C>(f<T>(hi));
        const T* vs = v + t * ld_in + (size_t)hh * D;
        vc[base + i] = to<C>(f<T>(vs[i]));
        vc[base + i + half] = to<C>(f<T>(vs[i + half]));
    }
}

// 16 bytes of a cached head at a time, converted exactly to float: 4 elements of f32, 8 of f16 /
// bf16, 16 of FP8 E4M3.
template <typename KV> struct Vec16;
template <> struct Vec16<float> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void cvt(const uint4& r, float* o) {
        o[0] = __uint_as_float(r.x), o[1] = __uint_as_float(r.y), o[2] = __uint_as_float(r.z), o[3] = __uint_as_float(r.w);
    }
};
__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
template <typename P> struct Pairs16 {  // 16 bytes of 2-element vectors P (half2, bfloat162)
    static constexpr int N = 8;
    static __device__ __forceinline__ void cvt(const uint4& r, float* o) {
        const P* h = reinterpret_cast<const P*>(&r);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 v = to_float2(h[i]);
            o[2 * i] = v.x, o[2 * i + 1] = v.y;
        }
    }
};
template <> struct Vec16<__half> : Pairs16<__half2> {};
template <> struct Vec16<__nv_bfloat16> : Pairs16<__nv_bfloat162> {};
template <> struct Vec16<__nv_fp8_e4m3> {
    static constexpr int N = 16;
    static __device__ __forceinline__ void cvt(const uint4& r, float* o) {
        const __nv_fp8x2_storage_t* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&r);
#pragma unroll
        for (int i = 0; i < 8; ++i) {  // E4M3 pairs to half pairs (exact, one instruction on sm_89+)
            const float2 v = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(p[i], __NV_E4M3)));
            o[2 * i] = v.x, o[2 * i + 1] = v.y;
        }
    }
};

// One block of ATTN_WARPS warps per (row, q head, split of kps keys): the launcher picks kps so that
// the grid fills the GPU (a large batch: one split of the whole context per block, no merge; a
// small one: flash-decoding over many splits). Split sp takes the keys sp kps .. min((sp + 1) kps,
// pos[row] + 1) - 1 (none when it starts past the row's position). A key is read by G lanes, 16
// bytes each (Vec16: lane g of the group holds head elements g N .. g N + N - 1, D <= G N), so a
// warp reads 32 / G keys a round and ATTN_ROUNDS rounds at once: every load of an iteration is in
// flight before any is used, and the next iteration's slots are loaded while this one computes.
// Each group keeps its own online softmax (one rescale per iteration, not per key); the groups of
// a warp, then the warps, merge at the end. One split (C <= kps): the block writes out. Several:
// each block writes its partial (m, l, acc[D], unnormalised) to ws [rows * Hq, splits, D + 2], and
// the last of a (row, head)'s blocks to finish merges them in split order (the same bits whatever
// order the blocks ran in) and writes out; counters [rows * Hq] count the finished blocks and are
// zero between launches (the last block resets its own). q [rows, Hq, D] contiguous; cache [slots,
// Hk, D] with 16-byte aligned rows (D a multiple of N); context [B, C] slots (row's sequence =
// row / S); pos[row] = the row's position: it sees keys 0 .. pos[row]. LIMITED (the _window
// kernels): with window > 0 only keys pos[row] - window + 1 .. pos[row] (a split wholly before them
// is empty), and with softcap > 0 each score s (scale included) becomes softcap * tanh(s / softcap).
// KV: the cache's element type (T, or FP8 E4M3: half the bytes a key).
constexpr int ATTN_WARPS = 4;
constexpr int ATTN_ROUNDS = 4;
template <typename T, typename KV, int G, bool LIMITED>
__device__ void paged_attention(const T* q, const KV* kc, const KV* vc, const long long* context, int C,
                                const long long* pos, T* out, float* ws, int* counters, int S, int Hq, int Hk, int D,
                                int kps, float scale, int window, float softcap) {
    pdl_start();
    constexpr int NW = ATTN_WARPS, U = ATTN_ROUNDS, N = Vec16<KV>::N, KR = 32 / G;
    constexpr unsigned FULL = 0xffffffffu;
    __shared__ float sm_m[NW], sm_l[NW], sm_acc[NW][256];
    __shared__ int is_last;
    const int row = blockIdx.x / Hq, h = blockIdx.x % Hq, kvh = h / (Hq / Hk);
    const int split = blockIdx.y, splits = gridDim.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane / G, d0 = (lane % G) * N;
    const bool holds = d0 < D;  // lanes past the head (D < G N) load nothing and add zeros
    const long long* ctx = context + (size_t)(row / S) * C;
    // the split's keys first .. last: none (last < first) past the row's position, none past C (a
    // position >= C sees the whole context, as in the torch twin)
    int first = split * kps;
    const int last = min(min(first + kps, C) - 1, (int)pos[row]);
    if constexpr (LIMITED) {
        if (window > 0) first = max(first, (int)pos[row] - window + 1);
    }
    float qv[N], acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) {
        qv[e] = holds ? f<T>(q[((size_t)row * Hq + h) * D + d0 + e]) * scale : 0.0f;
        acc[e] = 0.0f;
    }
    float m = neg_inf(), l = 0.0f;
    // a warp's iteration: keys j0 + u KR + grp, u < U (a key past last reads last's slot and weighs 0)
    constexpr int PER_WARP = KR * U;
    int j0 = first + warp * PER_WARP;
    long long slot[U];
#pragma unroll
    for (int u = 0; u < U; ++u) slot[u] = j0 <= last ? ctx[min(j0 + u * KR + grp, last)] : 0;
    for (; j0 <= last; j0 += NW * PER_WARP) {
        uint4 kr[U], vr[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const size_t base = ((size_t)slot[u] * Hk + kvh) * D + d0;
            kr[u] = holds ? __ldg(reinterpret_cast<const uint4*>(kc + base)) : make_uint4(0, 0, 0, 0);
            vr[u] = holds ? __ldg(reinterpret_cast<const uint4*>(vc + base)) : make_uint4(0, 0, 0, 0);
        }
        const int jn = j0 + NW * PER_WARP;
        if (jn <= last) {
#pragma unroll
            for (int u = 0; u < U; ++u) slot[u] = ctx[min(jn + u * KR + grp, last)];
        }
        float sc[U];
        float mt = m;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kf[N], a = 0.0f;
            Vec16<KV>::cvt(kr[u], kf);
#pragma unroll
            for (int e = 0; e < N; ++e) a += qv[e] * kf[e];
#pragma unroll
            for (int o = G / 2; o > 0; o >>= 1) a += __shfl_xor_sync(FULL, a, o);
            if constexpr (LIMITED) {
                if (softcap > 0.0f) a = softcap * tanhf(a / softcap);
            }
            sc[u] = j0 + u * KR + grp <= last ? a : neg_inf();
            mt = fmaxf(mt, sc[u]);
        }
        if (mt == neg_inf()) continue;  // this group's keys all lie past last
        const float corr = __expf(m - mt);
        l *= corr;
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] *= corr;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const float p = __expf(sc[u] - mt);
            float vf[N];
            Vec16<KV>::cvt(vr[u], vf);
            l += p;
#pragma unroll
            for (int e = 0; e < N; ++e) acc[e] += p * vf[e];
        }
        m = mt;
    }
    // the warp's groups merge (lane g of each group holds the same elements)
#pragma unroll
    for (int o = G; o < 32; o <<= 1) {
        const float mo = __shfl_xor_sync(FULL, m, o), lo = __shfl_xor_sync(FULL, l, o);
        const float mn = fmaxf(m, mo);
        const float ca = mn == neg_inf() ? 0.0f : __expf(m - mn), cb = mn == neg_inf() ? 0.0f : __expf(mo - mn);
        l = l * ca + lo * cb;
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] = acc[e] * ca + __shfl_xor_sync(FULL, acc[e], o) * cb;
        m = mn;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
    if (lane < G && holds) {
#pragma unroll
        for (int e = 0; e < N; ++e) sm_acc[warp][d0 + e] = acc[e];
    }
    __syncthreads();
    // the warps' merge, thread t taking elements t, t + blockDim.x, ... (a warp with no keys: m = -inf)
    float gm = neg_inf();
    for (int w = 0; w < NW; ++w) gm = fmaxf(gm, sm_m[w]);
    float gl = 0.0f;
    for (int w = 0; w < NW; ++w) gl += sm_m[w] == neg_inf() ? 0.0f : sm_l[w] * __expf(sm_m[w] - gm);
    T* o = out + (size_t)blockIdx.x * D;
    const size_t stride = D + 2;
    float* part = ws + (size_t)blockIdx.x * splits * stride;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < NW; ++w) v += sm_m[w] == neg_inf() ? 0.0f : sm_acc[w][d] * __expf(sm_m[w] - gm);
        if (splits == 1) {
            o[d] = to<T>(v / gl);
        } else {
            part[(size_t)split * stride + 2 + d] = v;
        }
    }
    if (splits == 1) return;

    // the split's partial (an empty split's: m = -inf, l = 0, acc = 0), then the last block to
    // finish merges them all
    if (threadIdx.x == 0) {
        part[(size_t)split * stride] = gm;
        part[(size_t)split * stride + 1] = gl;
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(counters + blockIdx.x, 1) == splits - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // every thread merges the same m, l in split order (L2 reads: the other blocks wrote them), in
    // one online pass without branches, so that the loads of 8 splits are in flight at once
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float mm = neg_inf(), ll = 0.0f, v = 0.0f;
#pragma unroll 8
        for (int s = 0; s < splits; ++s) {
            const float ms = __ldcg(part + s * stride), ls = __ldcg(part + s * stride + 1);
            const float as = __ldcg(part + s * stride + 2 + d);
            const float m_new = fmaxf(mm, ms);
            const float shift = m_new == neg_inf() ? 0.0f : m_new;  // both empty so far: everything stays 0
            const float c_old = __expf(mm - shift), c_new = __expf(ms - shift);
            ll = ll * c_old + ls * c_new;
            v = v * c_old + as * c_new;
            mm = m_new;
        }
        o[d] = to<T>(v / ll);
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch
}

// ---- per-token quantization of a row the block holds (W8A8's dynamic inputs) ------------------------
// The arithmetic of csrc/quantize_rows.cu, which is bit for bit formats.activation's on the same GPU:
//   s = max(absmax(row) * (1 / R), FLT_EPS), R = 448 (fp8) or 127.5 (int8), the reciprocal's
//       product as PyTorch's CUDA division by a scalar computes it; or a given (static) s
//   q = fp8:  e4m3(clamp(v / s, -448, 448))   (round to nearest even)
//       int8: clamp(rint(v / s), -128, 127)
// A row holding NaN gets a NaN scale (no device sync to check it), which carries into its output row.
template <typename Q> struct Quant;
template <> struct Quant<__nv_fp8_e4m3> {
    static constexpr float inv_range = 1.0f / 448.0f;
    static __device__ __forceinline__ __nv_fp8_e4m3 of(float v, float s) {
        return __nv_fp8_e4m3(fminf(fmaxf(v / s, -448.0f), 448.0f));
    }
};
template <> struct Quant<signed char> {
    static constexpr float inv_range = 1.0f / 127.5f;
    static __device__ __forceinline__ signed char of(float v, float s) {
        return (signed char)fminf(fmaxf(rintf(v / s), -128.0f), 127.0f);
    }
};

__device__ __forceinline__ float nan_max(float m, float v) { return (v != v || v > m) ? v : m; }  // NaN wins

// The largest of every thread's m, for every thread of the block (blockDim.x a multiple of 32).
__device__ float block_max(float m) {
    __shared__ float part[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) part[warp] = m;
    __syncthreads();
    if (warp == 0) {
        m = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) part[0] = m;
    }
    __syncthreads();
    return part[0];
}

// y: the thread's elements i = threadIdx.x + e * blockDim.x of a row of n values (0 past n), already
// rounded to the activations' type; q: the row's n outputs; scale: its one scale, written.
// given: the static per-tensor scale, or null: the row's own.
template <typename Q, int E>
__device__ __forceinline__ void quantize_row(const float (&y)[E], const float* given, Q* q, float* scale, int n) {
    float s;
    if (given != nullptr) {
        s = *given;
    } else {
        float m = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) m = nan_max(m, fabsf(y[e]));
        s = block_max(m) * Quant<Q>::inv_range;
        s = s < 1.1920928955078125e-07f ? 1.1920928955078125e-07f : s;  // NaN stays NaN (fmaxf would drop it)
    }
    if (threadIdx.x == 0) *scale = s;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int i = threadIdx.x + e * blockDim.x;
        if (i < n) q[i] = Quant<Q>::of(y[e], s);
    }
}

// add_rms_norm with its output quantized: the same row in the same registers, so the values
// quantized are those add_rms_norm writes. One block of NORM_THREADS per row; q [rows, H]
// contiguous, scale [rows]. offset 0: Llama's rounding, else Gemma's.
template <typename T, typename Q>
__device__ void add_rms_norm_quant(const T* x, int ldx, const T* res, int ldr, const T* w, float eps, float offset,
                                   const float* given, Q* q, float* scale, T* res_out, int ldro, int H) {
    pdl_start();
    float y[NORM_MAXE];
    if (offset != 0.0f) {
        norm_row<T, true>(x, ldx, res, ldr, w, eps, offset, res_out, ldro, H, y);
    } else {
        norm_row<T, false>(x, ldx, res, ldr, w, eps, offset, res_out, ldro, H, y);
    }
    quantize_row<Q, NORM_MAXE>(y, given, q + (size_t)blockIdx.x * H, scale + blockIdx.x, H);
}

// silu_mul with its output quantized: one block per row (the scale needs the whole row), the row
// in registers, I <= blockDim.x * ACT_QUANT_MAXE; q [rows, I] contiguous, scale [rows].
constexpr int ACT_QUANT_MAXE = 16;
template <typename T, typename Q>
__device__ void silu_mul_quant(const T* g, const T* u, int ld_in, const float* given, Q* q, float* scale, int I) {
    pdl_start();
    const size_t t = blockIdx.x;
    float y[ACT_QUANT_MAXE];
#pragma unroll
    for (int e = 0; e < ACT_QUANT_MAXE; ++e) {
        const int i = threadIdx.x + e * blockDim.x;
        y[e] = 0.0f;
        if (i < I) {  // silu_mul's arithmetic
            const float gv = f<T>(g[t * ld_in + i]);
            y[e] = r<T>(r<T>(gv / (1.0f + expf(-gv))) * f<T>(u[t * ld_in + i]));
        }
    }
    quantize_row<Q, ACT_QUANT_MAXE>(y, given, q + t * I, scale + t, I);
}

#define QUANT_OPS(QN, Q, SUFFIX, T)                                                                                 \
    extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_quant_##QN##_##SUFFIX(                          \
        const T* x, int ldx, const T* res, int ldr, const T* w, float eps, float offset, const float* given, Q* q,  \
        float* scale, T* res_out, int ldro, int H) {                                                                \
        add_rms_norm_quant<T, Q>(x, ldx, res, ldr, w, eps, offset, given, q, scale, res_out, ldro, H);             \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(1024) silu_mul_quant_##QN##_##SUFFIX(                              \
        const T* g, const T* u, int ld_in, const float* given, Q* q, float* scale, int I) {                        \
        silu_mul_quant<T, Q>(g, u, ld_in, given, q, scale, I);                                                      \
    }

#define ATTENTION(SUFFIX, T, KV, G)                                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) paged_attention_##SUFFIX##_g##G(                  \
        const T* q, const KV* kc, const KV* vc, const long long* context, int C, const long long* pos, T* out,      \
        float* ws, int* counters, int S, int Hq, int Hk, int D, int kps, float scale) {                             \
        paged_attention<T, KV, G, false>(q, kc, vc, context, C, pos, out, ws, counters, S, Hq, Hk, D, kps, scale,   \
                                         0, 0.0f);                                                                  \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) paged_attention_window_##SUFFIX##_g##G(           \
        const T* q, const KV* kc, const KV* vc, const long long* context, int C, const long long* pos, T* out,      \
        float* ws, int* counters, int S, int Hq, int Hk, int D, int kps, float scale, int window, float softcap) {  \
        paged_attention<T, KV, G, true>(q, kc, vc, context, C, pos, out, ws, counters, S, Hq, Hk, D, kps, scale,    \
                                        window, softcap);                                                           \
    }
// G lanes per key: their 16-byte reads cover a head of D <= G * Vec16<KV>::N
#define ATTENTIONS(SUFFIX, T, KV) ATTENTION(SUFFIX, T, KV, 4) ATTENTION(SUFFIX, T, KV, 8) ATTENTION(SUFFIX, T, KV, 16) \
    ATTENTION(SUFFIX, T, KV, 32)
// the cache written and read in FP8 E4M3 (EngineConfig.kv_cache_dtype = "fp8"), for T = f16 / bf16
#define KV8_OPS(SUFFIX, T)                                                                                          \
    extern "C" __global__ void rope_cache_##SUFFIX##_kv8(const T* q, const T* k, const T* v, int ld_in,             \
                                                         const T* cos, const T* sin, int ld_cs,                     \
                                                         const long long* slots, T* q_out, __nv_fp8_e4m3* kc,       \
                                                         __nv_fp8_e4m3* vc, int rows, int Hq, int Hk, int D) {      \
        rope_cache<T, __nv_fp8_e4m3>(q, k, v, ld_in, cos, sin, ld_cs, slots, q_out, kc, vc, rows, Hq, Hk, D);      \
    }                                                                                                               \
    ATTENTIONS(SUFFIX##_kv8, T, __nv_fp8_e4m3)
#define OPS(SUFFIX, T)                                                                                              \
    extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_##SUFFIX(const T* x, int ldx, const T* res, int ldr, const T* w,       \
                                                     float eps, T* out, int ldo, T* res_out, int ldro, int H) {     \
        add_rms_norm<T, false>(x, ldx, res, ldr, w, eps, 0.0f, out, ldo, res_out, ldro, H);                         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_offset_##SUFFIX(const T* x, int ldx, const T* res, \
                                                     int ldr, const T* w, float eps, float offset, T* out, int ldo, \
                                                     T* res_out, int ldro, int H) {                                 \
        add_rms_norm<T, true>(x, ldx, res, ldr, w, eps, offset, out, ldo, res_out, ldro, H);                        \
    }                                                                                                               \
    extern "C" __global__ void silu_mul_##SUFFIX(const T* g, const T* u, int ld_in, T* out, int I, int rows) {     \
        silu_mul<T>(g, u, ld_in, out, I, rows);                                                                     \
    }                                                                                                               \
    extern "C" __global__ void gelu_tanh_mul_##SUFFIX(const T* g, const T* u, int ld_in, T* out, int I, int rows) { \
        gelu_tanh_mul<T>(g, u, ld_in, out, I, rows);                                                                \
    }                                                                                                               \
    extern "C" __global__ void qk_rms_norm_##SUFFIX(const T* q, int ldq, const T* k, int ldk, const T* v, int ldv,  \
                                                    const T* qw, const T* kw, float eps, float offset, T* out,      \
                                                    int rows, int Hq, int Hk, int D) {                              \
        qk_rms_norm<T>(q, ldq, k, ldk, v, ldv, qw, kw, eps, offset, out, rows, Hq, Hk, D);                          \
    }                                                                                                               \
    extern "C" __global__ void rope_cache_##SUFFIX(const T* q, const T* k, const T* v, int ld_in, const T* cos,    \
                                                   const T* sin, int ld_cs, const long long* slots, T* q_out, T* kc, \
                                                   T* vc, int rows, int Hq, int Hk, int D) {                        \
        rope_cache<T, T>(q, k, v, ld_in, cos, sin, ld_cs, slots, q_out, kc, vc, rows, Hq, Hk, D);                   \
    }                                                                                                               \
    ATTENTIONS(SUFFIX, T, T)

OPS(f16, __half)
OPS(bf16, __nv_bfloat16)
OPS(f32, float)
KV8_OPS(f16, __half)
KV8_OPS(bf16, __nv_bfloat16)
QUANT_OPS(fp8, __nv_fp8_e4m3, f16, __half)
QUANT_OPS(fp8, __nv_fp8_e4m3, bf16, __nv_bfloat16)
QUANT_OPS(int8, signed char, f16, __half)
QUANT_OPS(int8, signed char, bf16, __nv_bfloat16)
