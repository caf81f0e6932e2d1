/* qmm on CUDA: y = x @ W^T with W in kernel/ops/qblocks.py's packed 4/8-bit blocks, the twin
 * of csrc/cpu/qmm.c. Two launches: kvos_qmm_quantize (one warp per row: each 32-block of x to
 * int8 with d = amax / 127, rounded half to even, and d * sum of its codes), then
 * kvos_qmm_blocks (one warp per tile of 16 output columns: lane c and lane 16 + c share column
 * c, taking even and odd blocks, integer dot products per block, summed at the end, for every
 * row). Simple, not tuned. */
#include "kvos_cuda.cuh"

#define QMM_NR 16
#define QMM_BLOCK 32

/* x (m, k) float32, row stride x_stride -> xq int8 (m, kb * 32), xd and xs float (m, kb).
 * Grid (m), block 32. */
extern "C" __global__ void kvos_qmm_quantize(const float *x, int64_t x_stride, int64_t k, int64_t kb,
                                             signed char *xq, float *xd, float *xs)
{
    const int64_t r = blockIdx.x;
    const int lane = threadIdx.x;
    for (int64_t b = 0; b < kb; b++) {
        const float v = x[r * x_stride + b * QMM_BLOCK + lane];
        float amax = fabsf(v);
        for (int o = 16; o; o >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        const float d = amax / 127.0f;
        float q = d > 0.0f ? rintf(v / d) : 0.0f;
        q = fminf(fmaxf(q, -127.0f), 127.0f);
        xq[(r * kb + b) * QMM_BLOCK + lane] = (signed char)q;
        float sum = q;   /* integers below 2^13: exact in float */
        for (int o = 16; o; o >>= 1)
            sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) {
            xd[r * kb + b] = d;
            xs[r * kb + b] = d * sum;
        }
    }
}

/* Code of column c, element e (0..31) of a record: vector j = e / 4, byte 4c + e % 4 (4-bit:
 * vectors j and j + 4 share a byte, low and high nibble). */
__device__ inline int qmm_code(const unsigned char *rec, int bits, int c, int e)
{
    const int j = e >> 2, i = e & 3;
    if (bits == 8)
        return rec[j * 64 + 4 * c + i];
    const int byte = rec[(j & 3) * 64 + 4 * c + i];
    return j < 4 ? byte & 15 : byte >> 4;
}

/* y (m, n) float32, row stride y_stride. Grid (tiles), block 32. */
extern "C" __global__ void kvos_qmm_blocks(float *y, int64_t y_stride, const signed char *xq, const float *xd,
                                           const float *xs, int64_t m, int64_t kb,
                                           const unsigned char *w, int64_t n, int32_t bits)
{
    const int64_t t = blockIdx.x;
    const int lane = threadIdx.x, c = lane & (QMM_NR - 1);
    const int64_t cb = bits == 4 ? 256 : 512, rb = cb + 4 * QMM_NR;
    const unsigned char *tile = w + t * kb * rb;
    for (int64_t r = 0; r < m; r++) {
        float acc = 0.0f;
        for (int64_t b = lane / QMM_NR; b < kb; b += 2) {
            const unsigned char *rec = tile + b * rb;
            const signed char *q = xq + (r * kb + b) * QMM_BLOCK;
            const kvos_half *s = (const kvos_half *)(rec + cb);   /* 16 d, then 16 m */
            int dot = 0;
            for (int e = 0; e < QMM_BLOCK; e++)
                dot += qmm_code(rec, bits, c, e) * (int)q[e];
            acc += (float)dot * xd[r * kb + b] * kvos_to_float(s[c]) + kvos_to_float(s[QMM_NR + c]) * xs[r * kb + b];
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, QMM_NR);
        if (lane < QMM_NR && t * QMM_NR + c < n)
            y[r * y_stride + t * QMM_NR + c] = acc;
    }
}
