/* simd.h: 16-float vectors for the CPU attention tiles, in GCC/Clang vector extensions.
 * One vector is one AVX-512 register; on narrower machines the compiler splits it, so
 * the code stays portable C. Used where autovectorisation cannot keep accumulators in
 * registers across a loop (register-blocked tiles) or sum 16 vectors across lanes. */
#ifndef KVOS_SIMD_H
#define KVOS_SIMD_H
#include <stdint.h>
#include "kvos_math.h"

#define VW 16   /* floats per vector */
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
/* The same vector, at any float address: pointer casts to it are unaligned, aliasing loads. */
typedef float vf_u __attribute__((vector_size(64), aligned(4), may_alias));

static inline vf vload(const float *p) { return *(const vf_u *)p; }
/* 8-float vectors (one AVX2 register): the panel kernels' AVX2 tiles, the fused ops; _u: any address. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8_u __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int32_t v8i_u __attribute__((vector_size(32), aligned(4), may_alias));
static inline void vstore(float *p, vf x) { *(vf_u *)p = x; }
typedef int32_t vi_u __attribute__((vector_size(64), aligned(4), may_alias));
static inline vi vload_i(const int32_t *p) { return *(const vi_u *)p; }
/* 16 bfloat16 values widened to floats (exact: a bf16 is the top half of a float). */
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint16_t vh_u __attribute__((vector_size(32), aligned(2), may_alias));
static inline vf vload_bf16(const uint16_t *p) { return (vf)(__builtin_convertvector(*(const vh_u *)p, vi) << 16); }
/* 16 int8 codes widened to floats (exact), for an int8 cache's rows (q8.h) widened in registers.
 * gcc 12 turns __builtin_convertvector from int8 lanes into 16 scalar moves and inserts (seen in
 * the disassembly, 2x slower attention than widening the tile first), so AVX-512 builds say it. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vf vload_i8(const int8_t *p)
{
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#else
typedef int8_t vb_u __attribute__((vector_size(16), aligned(1), may_alias));
static inline vf vload_i8(const int8_t *p) { return __builtin_convertvector(*(const vb_u *)p, vf); }
#endif
static inline vf vsplat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline vi visplat(int32_t x) { return (vi){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
/* Lane-wise mask ? a : b, for a mask of all-ones / all-zeros lanes from a vector comparison. */
static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }

static inline v8 v8splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }
static inline v8 v8select(v8i mask, v8 a, v8 b) { return (v8)(((v8i)a & mask) | ((v8i)b & ~mask)); }

/* kvos_exp2 (csrc/common/kvos_math.h) on a vector, with the same clamps, rounding trick and
 * polynomial: NAME(V x) for float vector V, int vector VI and their splat and select. */
#define KVOS_DEFINE_VEXP2(NAME, V, VI, SPLAT, SELECT)                   \
    static inline V NAME(V x)                                           \
    {                                                                   \
        x = SELECT(x < SPLAT(-126.0f), SPLAT(-126.0f), x);              \
        x = SELECT(x > SPLAT(127.0f), SPLAT(127.0f), x);                \
        V n = (x + KVOS_ROUND_MAGIC) - KVOS_ROUND_MAGIC;                \
        V f = x - n;                                                    \
        VI scale = (__builtin_convertvector(n, VI) + 127) << 23;        \
        return KVOS_EXP2_POLY(f) * (V)scale;                            \
    }
/* 16 lanes (the attention tiles), and 8 (one AVX2 register, two halves of one elsewhere: the
 * fused ops' row loops, whose scalar form gcc leaves unvectorised for the union in kvos_exp2). */
KVOS_DEFINE_VEXP2(vexp2, vf, vi, vsplat, vselect)
KVOS_DEFINE_VEXP2(v8exp2, v8, v8i, v8splat, v8select)

#if defined(__clang__)
#define VSHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define VSHUF(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

/* Sum each of 16 vectors across its lanes: returns (sum(x[0]), ..., sum(x[15])).
 * A transpose-and-add tree: 15 pair merges, each two shuffles and one add, instead of
 * 16 separate horizontal sums (which would cost twice the shuffles). */
static inline __attribute__((always_inline)) vf vsum16(const vf x[16])
{
    vf a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)   /* lanes: 8 partials of token 2i | 8 of token 2i+1 */
        a[i] = VSHUF(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + VSHUF(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)   /* 4 partials of each of 4 tokens */
        b[i] = VSHUF(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + VSHUF(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)   /* 2 partials of each of 8 tokens */
        c[i] = VSHUF(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + VSHUF(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return VSHUF(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + VSHUF(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

#endif
