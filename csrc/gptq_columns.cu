// GPTQ's column loop over one lazy block, for every output row in one launch.
//
// The torch twin (quantkit.kernels.gptq_columns.gptq_columns_reference) runs the
// columns one after another with about eight small kernels each, so a 14336-wide
// linear costs some 100k launches. Output rows are independent given the Hessian,
// so here each thread owns one row and walks the columns itself:
//
//   for i in [c0, c1):
//       q      = clamp(rint(w[i] / s + z), qmin, qmax)        (z = 0 when symmetric)
//       e      = (w[i] - (q - z) * s) / U1[i, i]
//       Q1[i]  = q,  E1[i] = e
//       w[k]  -= U1[i, k] * e                   for i < k < B
//
// with s, z the row's quantization parameters of column i's group (groups[i]).
// The row's B columns live in shared memory ([B][blockDim.x] floats: each thread
// touches only its own column of it, so no barrier is needed, and consecutive
// threads hit consecutive banks); U1's row i is the same for every thread (one
// broadcast load). Quantization parameters that depend on the updated columns
// are computed by the caller between launches ([c0, c1) never crosses a group
// start when they do).
//
// Layouts (float32, row-major): W1, Q1, E1 [B, out] (column i of the weight is
// row i here, as the twin keeps W transposed); U1 [B, B] with row stride ldu;
// s_rows, z_rows [n_groups, out]; groups int32 [B]. W1's rows c0.. are updated in
// place. One thread per output row; the grid covers `out`.

extern "C" __global__ void gptq_columns(float* __restrict__ W1, float* __restrict__ Q1, float* __restrict__ E1,
                                        const float* __restrict__ U1, long ldu, const float* __restrict__ s_rows,
                                        const float* __restrict__ z_rows, const int* __restrict__ groups, int out,
                                        int B, int c0, int c1, int symmetric, float qmin, float qmax) {
    extern __shared__ float w[];
    const int t = threadIdx.x, n = blockDim.x;
    const int r = blockIdx.x * n + t;
    if (r >= out) return;  // no barrier below: a thread past the last row may leave
    for (int k = c0; k < B; ++k) w[k * n + t] = W1[(long)k * out + r];
    for (int i = c0; i < c1; ++i) {
        const float wi = w[i * n + t];
        const long g = (long)groups[i] * out + r;
        const float s = s_rows[g];
        const float z = symmetric ? 0.0f : z_rows[g];
        // the twin's operations, each rounded as torch's: w / s, + z, round half to even, clamp
        float q = __fdiv_rn(wi, s);
        if (!symmetric) q = __fadd_rn(q, z);
        q = fminf(fmaxf(rintf(q), qmin), qmax);
        const float deq = symmetric ? __fmul_rn(q, s) : __fmul_rn(__fsub_rn(q, z), s);
        const float* u = U1 + (long)i * ldu;
        const float e = __fdiv_rn(__fsub_rn(wi, deq), u[i]);
        Q1[(long)i * out + r] = q;
        E1[(long)i * out + r] = e;
#pragma unroll 8
        for (int k = i + 1; k < B; ++k) w[k * n + t] = fmaf(-u[k], e, w[k * n + t]);
    }
    for (int k = c0; k < B; ++k) W1[(long)k * out + r] = w[k * n + t];
}
