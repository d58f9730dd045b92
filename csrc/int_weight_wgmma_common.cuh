// Device code shared by csrc/int_weight_wgmma.cu ("rs") and csrc/int_weight_wgmma_ws.cu ("ws", "ws4"), the
// Hopper (sm_90a) GEMMs for integer weights: the wgmma wrappers (register A operand, x from a 128-byte-
// swizzled shared-memory tile), the epilogue, and the dequantizers that turn a unit's words into wgmma's
// A fragments. quantkit.kernels.cuda.source() pastes it in place of its #include line.
#include "int_weight_common.cuh"

typedef unsigned long long u64;

constexpr int BK = 64;   // columns per k-tile (two 32-column units)

template <typename T, int N> __device__ __forceinline__ void wgmma_rs(float* d, const u32* a, u64 db, int acc);
template <> __device__ __forceinline__ void wgmma_rs<__half, 32>(float* d, const u32* a, u64 db, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}
template <> __device__ __forceinline__ void wgmma_rs<__nv_bfloat16, 32>(float* d, const u32* a, u64 db, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}
template <> __device__ __forceinline__ void wgmma_rs<__half, 64>(float* d, const u32* a, u64 db, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}
template <> __device__ __forceinline__ void wgmma_rs<__nv_bfloat16, 64>(float* d, const u32* a, u64 db, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}
template <> __device__ __forceinline__ void wgmma_rs<__half, 128>(float* d, const u32* a, u64 db, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}
template <> __device__ __forceinline__ void wgmma_rs<__nv_bfloat16, 128>(float* d, const u32* a, u64 db, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}
template <> __device__ __forceinline__ void wgmma_rs<__half, 256>(float* d, const u32* a, u64 db, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}
template <> __device__ __forceinline__ void wgmma_rs<__nv_bfloat16, 256>(float* d, const u32* a, u64 db, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}

// A [rows][64] tile of 2-byte T in the 128-byte swizzle (rows of 128 bytes, 16-byte chunk c of row r at
// chunk c ^ (r & 7); 1024-byte aligned): stride 1024 bytes per 8 rows; a k16 step starts 32 bytes further.
__device__ __forceinline__ u64 tile_desc(const void* p) {
    const u32 a = (u32)__cvta_generic_to_shared(p);
    return (u64)((a & 0x3ffffu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
__device__ __forceinline__ u32 swizzled(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }
// The dynamic shared memory, 1024-byte aligned for the swizzle (the launch asks for 1 KB more).
__device__ __forceinline__ unsigned char* aligned_smem(unsigned char* raw) {
    const u32 a = (u32)__cvta_generic_to_shared(raw);
    return raw + (((a + 1023u) & ~1023u) - a);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy writes to shared memory (stores, cp.async) made visible to wgmma's async proxy.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator accesses across the asynchronous wgmma.
template <int R> __device__ __forceinline__ void fence_acc(float* d) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// 16 bytes from global to shared, zeros where !ok (src-size 0 reads nothing).
__device__ __forceinline__ void cp_async16_or_zero(void* smem, const void* gmem, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"((u32)__cvta_generic_to_shared(smem)),
                 "l"(gmem), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"((u32)__cvta_generic_to_shared(smem)), "l"(gmem));
}

// The WGS warpgroups that hold the accumulators (threads 0 .. 128 WGS - 1), without the ws kernel's producer.
template <int WGS> __device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;\n" ::"n"(128 * WGS) : "memory");
}

// The block's tile of y from the accumulators of its WGS warpgroups (64 WGS weight rows; accumulator i:
// weight row 16 w4 + g + 8 ((i >> 1) & 1) of the warpgroup's 64, token 8 (i >> 2) + 2 t + (i & 1)), plus
// bias; with K splits, the float32 partials go to ws and the last block of the tile to arrive adds them in
// split order.
template <typename T, int BN, int WGS = 2>
__device__ __forceinline__ void store_tile(const float* acc, const T* __restrict__ bias, T* __restrict__ y,
                                           float* __restrict__ ws, u32* __restrict__ counters, int M, int N, int ldy,
                                           int m0) {
    constexpr int ROWS = 64 * WGS, THREADS = 128 * WGS;
    const int tid = threadIdx.x, wg = tid >> 7, w4 = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int n_base = blockIdx.x * ROWS + wg * 64 + 16 * w4 + g;
    const int splits = gridDim.y, Np = gridDim.x * ROWS;
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) {
        const int n = n_base + 8 * ((i >> 1) & 1), m = m0 + 8 * (i >> 2) + 2 * t + (i & 1);
        if (m >= M) continue;
        if (splits == 1) {
            if (n < N) y[(size_t)m * ldy + n] = from_float<T>(bias != nullptr ? acc[i] + to_float<T>(bias[n]) : acc[i]);
        } else {
            ws[((size_t)blockIdx.y * M + m) * Np + n] = acc[i];
        }
    }
    if (splits == 1) return;

    __shared__ u32 is_last;
    __threadfence();
    consumers_sync<WGS>();
    u32* counter = counters + (size_t)blockIdx.z * gridDim.x + blockIdx.x;
    if (tid == 0) is_last = atomicAdd(counter, 1u) == (u32)(splits - 1);
    consumers_sync<WGS>();
    if (!is_last) return;
    __threadfence();
    const int rows = min(BN, M - m0);
    for (int item = tid; item < rows * ROWS; item += THREADS) {
        const int m = m0 + item / ROWS, n = blockIdx.x * ROWS + item % ROWS;
        if (n >= N) continue;
        float v = 0.0f;
        for (int s = 0; s < splits; ++s) v += __ldcg(ws + ((size_t)s * M + m) * Np + n);
        y[(size_t)m * ldy + n] = from_float<T>(bias != nullptr ? v + to_float<T>(bias[n]) : v);
    }
    if (tid == 0) *counter = 0u;
}

// ---- The A operand: the dequantized weights from registers, B (x, its columns permuted) from shared memory --
// Warp w4 of a warpgroup holds rows 16 w4 .. 16 w4 + 15 of its 64: row half rt = w4 & 1 of row block
// 2 wg + (w4 >> 1). In a unit's layout, lane (g, t)'s word rt * 2 + h is then exactly wgmma's A fragment of
// k16 step h (rows g, g + 8; fragment columns 2t, 2t + 1, 2t + 8, 2t + 9): the A operand needs no shuffle,
// but its K order is the fragment order, so x comes pre-permuted (xf, quantkit.kernels.int_weight_cuda):
// column 16 h + 8 hc + 2 t + c of a unit in xf is column 8 t + 4 h + 2 hc + c of x.
// Registers: k-tile i's 16 A registers are read by its wgmma until wgmma.wait_group retires it; the next
// k-tile is dequantized into the other set only after the wait that retired the k-tile before (two sets,
// the loop unrolled by two so that each set is fixed registers).
template <typename T> struct Tile16 {  // one word -> the 4 A registers (rows g, g + 8), (q - z) * s in T
    typedef typename Pair<T>::type T2;
    __device__ static __forceinline__ u32 fin(u32 v, T2 z, T2 s) { return as_u32<T>(__hmul2(__hsub2(as_pair<T>(v), z), s)); }
    __device__ static __forceinline__ void dequant(u32 w, u32* a, T2 z0, T2 z1, T2 s0, T2 s1) {
        typedef Magic<T, 4> C;
        a[0] = fin(C::template pair<0x000f000fu>(w), z0, s0);
        a[1] = fin(C::template pair<0x000f000fu>(w >> 4), z1, s1);
        a[2] = fin(C::template pair<0x000f000fu>(w >> 8), z0, s0);
        a[3] = fin(C::template pair<0x000f000fu>(w >> 12), z1, s1);
    }
};
template <> struct Tile16<__half> {  // the odd nibbles in place, as Unit<__half, 4> does
    __device__ static __forceinline__ void dequant(u32 w, u32* a, __half2 z0, __half2 z1, __half2 s0, __half2 s1) {
        const __half2 sixteenth = __float2half2_rn(0.0625f), nz1 = __hsub2(__float2half2_rn(960.0f), z1);
#pragma unroll
        for (int hc = 0; hc < 2; ++hc) {
            const u32 v = w >> (8 * hc);
            const __half2 lo = __hsub2(as_pair<__half>(and_or<0x000f000fu, 0x64006400u>(v)), z0);
            const __half2 hi = __hfma2(as_pair<__half>(and_or<0x00f000f0u, 0x64006400u>(v)), sixteenth, nz1);
            a[2 * hc] = as_u32<__half>(__hmul2(lo, s0));
            a[2 * hc + 1] = as_u32<__half>(__hmul2(hi, s1));
        }
    }
};

// 8-bit weights (the "ws" kernel): part rt of a unit holds words h * 2 + hc with byte c * 2 + hr at row
// g + 8 hr, column 8 t + 4 h + 2 hc + c; bytes (hr, 2 + hr) of word h * 2 + hc are register hc * 2 + hr of
// k16 step h's A fragment (the mma kernel's Unit<T, 8> reads them the same way).
template <typename T> struct Tile16x8 {
    typedef typename Pair<T>::type T2;
    __device__ static __forceinline__ u32 fin(u32 v, T2 z, T2 s) { return as_u32<T>(__hmul2(__hsub2(as_pair<T>(v), z), s)); }
    __device__ static __forceinline__ void dequant(u32 w0, u32 w1, u32* a, T2 z0, T2 z1, T2 s0, T2 s1) {
        typedef Magic<T, 8> C;
        a[0] = fin(C::template pair<0x00ff00ffu>(w0), z0, s0);
        a[1] = fin(C::template pair<0x00ff00ffu>(w0 >> 8), z1, s1);
        a[2] = fin(C::template pair<0x00ff00ffu>(w1), z0, s0);
        a[3] = fin(C::template pair<0x00ff00ffu>(w1 >> 8), z1, s1);
    }
};

// The scale and zero of a lane's rows g and g + 8 (a pair each in the tables), splat for the Tile16 ops;
// symmetric weights take sym_zero.
template <typename T, bool ASYM> struct RowParams {
    typedef typename Pair<T>::type T2;
    T2 s0, s1, z0, z1;
    __device__ __forceinline__ RowParams(u32 s, u32 z, T2 sym_zero) : z0(sym_zero), z1(sym_zero) {
        if (ASYM) {
            const T2 zz = as_pair<T>(z);
            z0 = splat<T>(zz.x);
            z1 = splat<T>(zz.y);
        }
        const T2 ss = as_pair<T>(s);
        s0 = splat<T>(ss.x);
        s1 = splat<T>(ss.y);
    }
};

// One k-tile's 4 k16 wgmmas (A: the registers `a`, B: the swizzled x tile xs), then the wait that retires
// the k-tile before: after it, that k-tile's A registers and x tile may be rewritten.
template <typename T, int BN>
__device__ __forceinline__ void mma_ktile_retire_previous(float* acc, const u32* a, const unsigned char* xs) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) wgmma_rs<T, BN>(acc, a + 4 * kk, tile_desc(xs + kk * 32), 1);
    wgmma_commit();
    fence_acc<BN / 2>(acc);
    wgmma_wait<1>();
    fence_acc<BN / 2>(acc);
}
