/* qmm on CUDA: y = x @ W^T with W in kernel/ops/qblocks.py's packed 4/8-bit blocks, the twin
 * of csrc/cpu/qmm.c. Two launches: kvos_qmm_quantize (one warp per row: each 32-block of x to
 * int8 with d = amax / 127, rounded half to even, and d * sum of its codes), then
 * kvos_qmm_blocks (one warp per tile of 4 output columns: lanes take pairs of blocks in turn,
 * integer dot products per block, a warp sum at the end, for every row). Simple, not tuned. */
#include "kvos_cuda.cuh"

#define QMM_NR 4
#define QMM_PAIR 64

__device__ inline float qmm_warp_sum(float v)
{
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* x (m, k) float32, row stride x_stride -> xq int8 (m, npairs * 64), xd and xs float (m, npairs * 2);
 * a missing last block of a pair is zeros. Grid (m), block 32. */
extern "C" __global__ void kvos_qmm_quantize(const float *x, int64_t x_stride, int64_t k, int64_t npairs,
                                             signed char *xq, float *xd, float *xs)
{
    const int64_t r = blockIdx.x;
    const int lane = threadIdx.x;
    for (int64_t b = 0; b < 2 * npairs; b++) {
        const float v = b * 32 < k ? x[r * x_stride + b * 32 + lane] : 0.0f;
        float amax = fabsf(v);
        for (int o = 16; o; o >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        const float d = amax / 127.0f;
        float q = d > 0.0f ? rintf(v / d) : 0.0f;
        q = fminf(fmaxf(q, -127.0f), 127.0f);
        xq[r * npairs * QMM_PAIR + b * 32 + lane] = (signed char)q;
        const float sum = qmm_warp_sum(q);   /* integers below 2^13: exact in float */
        if (lane == 0) {
            xd[r * npairs * 2 + b] = d;
            xs[r * npairs * 2 + b] = d * sum;
        }
    }
}

/* y (m, n) float32, row stride y_stride. Grid (tiles), block 32. */
extern "C" __global__ void kvos_qmm_blocks(float *y, int64_t y_stride, const signed char *xq, const float *xd,
                                           const float *xs, int64_t m, int64_t npairs,
                                           const unsigned char *w, int64_t n, int32_t bits)
{
    const int64_t t = blockIdx.x;
    const int lane = threadIdx.x;
    const int64_t cb = bits == 4 ? QMM_PAIR / 2 : QMM_PAIR, rb = QMM_NR * (cb + 8);
    const unsigned char *tile = w + t * npairs * rb;
    for (int64_t r = 0; r < m; r++) {
        float acc[QMM_NR] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t p = lane; p < npairs; p += 32) {
            const unsigned char *rec = tile + p * rb;
            const signed char *xp = xq + (r * npairs + p) * QMM_PAIR;
            for (int c = 0; c < QMM_NR; c++) {
                const unsigned char *codes = rec + c * cb;
                const kvos_half *s = (const kvos_half *)(rec + QMM_NR * cb) + 4 * c;   /* d0 d1 m0 m1 */
                for (int h = 0; h < 2; h++) {
                    int dot = 0;
                    for (int i = 0; i < 32; i++) {
                        const int j = h * 32 + i;
                        const int u = bits == 4 ? (h == 0 ? codes[i] & 15 : codes[i] >> 4) : codes[j];
                        dot += u * (int)xp[j];
                    }
                    const int64_t b = (r * npairs + p) * 2 + h;
                    acc[c] += (float)dot * kvos_to_float(s[h]) * xd[b] + kvos_to_float(s[2 + h]) * xs[b];
                }
            }
        }
        for (int c = 0; c < QMM_NR; c++) {
            const float v = qmm_warp_sum(acc[c]);
            if (lane == 0 && t * QMM_NR + c < n)
                y[r * y_stride + t * QMM_NR + c] = v;
        }
    }
}
