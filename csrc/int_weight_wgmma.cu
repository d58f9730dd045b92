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
// measured (csrc/NOTES.md, v6); it is kept under the git tag wgmma-ss-variant.
//
// K splits: blockIdx.y takes `kt_per_split` k-tiles; with gridDim.y > 1 each block writes its
// float32 partial tile to ws [S, M, 128 gridDim.x] and the last block of the tile to arrive (a
// counter per tile, reset by it) adds the S partials in split order: deterministic.
#include "int_weight_common.cuh"

typedef unsigned long long u64;

constexpr int BM = 128;  // weight rows per block (two warpgroups of 64)
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

// ---- RS: A (the dequantized weights) from registers, B (x, its columns permuted) from shared memory --------
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
            const T2 s = as_pair<T>(reinterpret_cast<const u32*>(slot_at(slot, L::X + L::W))[2 * tid + u]);
            T2 z0 = sym_zero, z1 = sym_zero;
            if (ASYM) {
                const T2 z = as_pair<T>(reinterpret_cast<const u32*>(slot_at(slot, L::X + L::W + L::S))[2 * tid + u]);
                z0 = splat<T>(z.x);
                z1 = splat<T>(z.y);
            }
            const T2 s0 = splat<T>(s.x), s1 = splat<T>(s.y);
            Tile16<T>::dequant(q.x, a + 8 * u, z0, z1, s0, s1);
            Tile16<T>::dequant(q.y, a + 8 * u + 4, z0, z1, s0, s1);
        }
    };

    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.0f;
    auto step = [&](int i, u32 (&cur)[16], u32 (&nxt)[16]) {
        const unsigned char* xs = slot_at(i % STAGES, 0);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) wgmma_rs<T, BN>(acc, cur + 4 * kk, tile_desc(xs + kk * 32), 1);
        wgmma_commit();
        fence_acc<ACC>(acc);
        wgmma_wait<1>();  // k-tile i - 1 retired: its registers (nxt) and its ring slot are free
        fence_acc<ACC>(acc);
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

// ---- WS: warp-specialized, the ring fed by the copy engine (TMA bulk copies) -------------------------------
// The rs kernel's consumers (the two warpgroups, the same registers and wgmma order), fed by a producer
// warp (threads 256-287 of a producer warpgroup) instead of their own cp.async: per k-tile its lanes issue bulk copies
// (cp.async.bulk, the async proxy: no proxy fence) of the 4 row blocks' 1 KB of words, their 64-byte
// scale (and zero) rows, and the x tile, which wgmma_x_tiles has laid out beforehand exactly as the slot
// holds it (fragment order, 128-byte swizzle, zeros past M and K: one contiguous BN x 128-byte copy).
// full[s] completes when a slot's bytes have landed (the producer's expect_tx), empty[s] when the 8
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
            const T2 s = as_pair<T>(*reinterpret_cast<const u32*>(smem + L::S_AT + at));
            T2 z0 = sym_zero, z1 = sym_zero;
            if (ASYM) {
                const T2 z = as_pair<T>(*reinterpret_cast<const u32*>(smem + L::Z_AT + at));
                z0 = splat<T>(z.x);
                z1 = splat<T>(z.y);
            }
            const T2 s0 = splat<T>(s.x), s1 = splat<T>(s.y);
            if (BITS == 4) {  // the lane's words rt * 2 + h
                const uint2 q = *reinterpret_cast<const uint2*>(unit + (2 * lane + rt) * 8);
                Tile16<T>::dequant(q.x, a + 8 * u, z0, z1, s0, s1);
                Tile16<T>::dequant(q.y, a + 8 * u + 4, z0, z1, s0, s1);
            } else {  // part rt's 4 words h * 2 + hc
                const uint4 q = *reinterpret_cast<const uint4*>(unit + rt * 512 + lane * 16);
                Tile16x8<T>::dequant(q.x, q.y, a + 8 * u, z0, z1, s0, s1);
                Tile16x8<T>::dequant(q.z, q.w, a + 8 * u + 4, z0, z1, s0, s1);
            }
        }
    };

    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.0f;
    auto step = [&](int i, u32 (&cur)[16], u32 (&nxt)[16]) {
        const unsigned char* xs = smem + (i % STAGES) * L::X;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) wgmma_rs<T, BN>(acc, cur + 4 * kk, tile_desc(xs + kk * 32), 1);
        wgmma_commit();
        fence_acc<ACC>(acc);
        wgmma_wait<1>();  // k-tile i - 1 retired: its registers (nxt) and its slot are free
        fence_acc<ACC>(acc);
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
        int_weight_wgmma_ws<T, BITS, ASYM, BN, STAGES, MINB, WGS>(xt, w, scales, zeros, bias, y, ws, counters, M, N, RB, KS, ldy, tr,     \
                                                 sshift, sps, kt_per_split);                                             \
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
#define WGMMA_ALL(SUFFIX, T, ASYM) WGMMA_TILES(rs, SUFFIX, T, ASYM) WS_TILES(SUFFIX, T, 4, ASYM, 8)

WGMMA_ALL(f16_b4_sym, __half, false)
WGMMA_ALL(f16_b4_asym, __half, true)
WGMMA_ALL(bf16_b4_sym, __nv_bfloat16, false)
WGMMA_ALL(bf16_b4_asym, __nv_bfloat16, true)
// 8-bit weights: the ws kernel only (BN = 64: 6 stages, so that two blocks still fit)
WS_TILES(f16_b8_sym, __half, 8, false, 6)
WS_TILES(f16_b8_asym, __half, 8, true, 6)
WS_TILES(bf16_b8_sym, __nv_bfloat16, 8, false, 6)
WS_TILES(bf16_b8_asym, __nv_bfloat16, 8, true, 6)
