/* draw.c: one token drawn from each logits row under temperature, min-p, top-k and top-p, by inverse
 * CDF on one uniform per row, which the caller draws from the row's own generator (kernel/sampling.py).
 * The contract is the twin's docstring (kernel/ops/reference.py, draw_tokens); kernel/ops/draw.py
 * checks the arguments. Every filter is a threshold on the scaled logits s = x / T, so a row keeps
 * the tokens with s >= its threshold: min-p's from the max, top-k's the k-th largest s, top-p's the
 * weight of the last token its nucleus needs (ties at a threshold are kept). A row costs a few passes
 * over the vocabulary: scale and max; the k-th largest from the few tokens near the max; the weights
 * exp(s - max) with their block sums in double; the nucleus by bisection over the heaviest weights;
 * then a walk over the block sums to the uniform's block. Nothing is sorted: the twin's sort of a
 * row (3-4 ms at SmolLM2's 49,152 tokens on one core) never happens here. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "kvos_cpu.h"
#include "simd.h"

#define BLOCK 64             /* weights per block sum: the draw walks blocks, then one block's weights */
#define WIDEST_STEP 4096.0f  /* past this distance below the max, top-k takes every finite token */

/* numpy's argmax: the first NaN, else the first maximum (kernel/sampling.py's greedy token). A row
 * with a NaN, an infinite maximum or nothing finite draws it instead of sampling. */
static int64_t greedy(const float *x, int64_t n)
{
    int64_t best = 0;
    for (int64_t j = 0; j < n; j++) {
        if (x[j] != x[j])
            return j;
        if (x[j] > x[best])
            best = j;
    }
    return best;
}

static int64_t count_at_least(const float *v, int64_t n, float bound)
{
    int64_t c = 0;
    #pragma omp simd reduction(+:c)
    for (int64_t j = 0; j < n; j++)
        c += v[j] >= bound;
    return c;
}

/* Weights widened to double 8 at a time (gcc's vector extension: vcvtps2pd where the CPU has it). */
typedef double vd8 __attribute__((vector_size(64)));

static inline double vd8_sum(vd8 a)
{
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* The mass of the weights at least bound, in double (weights are >= 0). */
static double mass_at_least(const float *w, int64_t n, float bound)
{
    vd8 acc0 = {0}, acc1 = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        v8 a = *(const v8_u *)(w + j), b = *(const v8_u *)(w + j + 8);
        acc0 += __builtin_convertvector(v8select(a >= v8splat(bound), a, v8splat(0.0f)), vd8);
        acc1 += __builtin_convertvector(v8select(b >= v8splat(bound), b, v8splat(0.0f)), vd8);
    }
    double m = vd8_sum(acc0 + acc1);
    for (; j < n; j++)
        m += w[j] >= bound ? (double)w[j] : 0.0;
    return m;
}

/* bsum[b] = the double sum of weights b * BLOCK .. (b + 1) * BLOCK - 1; returns their total. */
static double block_sums(const float *w, int64_t n, double *bsum)
{
    double total = 0.0;
    for (int64_t b = 0; b * BLOCK < n; b++) {
        const int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        bsum[b] = mass_at_least(w + b * BLOCK, end - b * BLOCK, 0.0f);
        total += bsum[b];
    }
    return total;
}

/* Copy the values at least bound into out (in order); a vector test skips the 16-value stretches
 * with none, which is nearly all of a row. Returns how many. */
static int64_t collect_at_least(const float *v, int64_t n, float bound, float *out)
{
    int64_t c = 0, j = 0;
    for (; j + VW <= n; j += VW) {
        int hit = 0;
        #pragma omp simd reduction(|:hit)
        for (int i = 0; i < VW; i++)
            hit |= v[j + i] >= bound;
        if (hit)
            for (int i = 0; i < VW; i++)
                if (v[j + i] >= bound)
                    out[c++] = v[j + i];
    }
    for (; j < n; j++)
        if (v[j] >= bound)
            out[c++] = v[j];
    return c;
}

/* Floats as ordered integers (a < b as floats iff key(a) < key(b), but for -0 < +0), for bisection
 * over every float between two bounds. */
static inline int32_t key_of(float f)
{
    int32_t i;
    memcpy(&i, &f, sizeof i);
    return i ^ ((i >> 31) & 0x7fffffff);
}

static inline float float_of(int64_t key)
{
    int32_t i = (int32_t)key;
    i ^= (i >> 31) & 0x7fffffff;
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}

/* The largest float v in [float_of(lo), float_of(hi)) such that the n values reach `needed` in
 * count (mass 0) or in mass (mass 1) counting only those >= v, given that lo reaches it and hi not. */
static float bisect(const float *v, int64_t n, int64_t lo, int64_t hi, double needed, int mass)
{
    while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        const double got = mass ? mass_at_least(v, n, float_of(mid)) : (double)count_at_least(v, n, float_of(mid));
        if (got >= needed)
            lo = mid;
        else
            hi = mid;
    }
    return float_of(lo);
}

/* The k-th largest of the row's scaled logits (1 <= k < n): the values within a widening distance
 * of the max are counted (one vector pass each) until there are k; then, over those alone, a
 * bisection on the float between that bound and the max finds the largest v that k of them reach.
 * Ties make no difference (the k-th largest is such a v). */
static float kth_largest(const float *s, int64_t n, float max, int64_t k, float *scratch)
{
    float bound = -INFINITY;
    for (float step = 1.0f; step <= WIDEST_STEP; step *= 2.0f)
        if (count_at_least(s, n, max - step) >= k) {
            bound = max - step;
            break;
        }
    const int64_t c = collect_at_least(s, n, bound, scratch);
    return bisect(scratch, c, key_of(bound), (int64_t)key_of(max) + 1, (double)k, 0);
}

/* w[j] = exp(s[j] - max) where s[j] >= threshold and s[j] is not -inf, else 0, in place over s;
 * bsum[b] the double sum of block b's weights. Returns the row's mass. */
static double weigh(float *s, int64_t n, float max, float threshold, double *bsum)
{
    int64_t j = 0;
    for (; j + VW <= n; j += VW) {
        vf v = vload(s + j);
        vf w = vexp2((v - vsplat(max)) * vsplat(KVOS_LOG2E));
        vi kept = (v >= vsplat(threshold)) & (v > vsplat(-INFINITY));
        vstore(s + j, vselect(kept, w, vsplat(0.0f)));
    }
    for (; j < n; j++)
        s[j] = s[j] >= threshold && s[j] > -INFINITY ? kvos_exp2((s[j] - max) * KVOS_LOG2E) : 0.0f;
    return block_sums(s, n, bsum);
}

/* The smallest weight top-p keeps: ranked heaviest first, a token stays while the mass ranked above
 * it is below top_p x total, which keeps exactly the weights w >= v for the largest v whose weights
 * at least it hold that mass. Bounds falling by 8x find where v lies (one vector pass each); then the
 * weights above the bound alone are bisected on the float between the two bounds. */
static float nucleus_floor(const float *w, int64_t n, double total, double top_p, float *scratch)
{
    const double needed = top_p * total;
    float bound = 0.0f, above = INFINITY;
    for (float b = 0.125f; b > 1e-37f; above = b, b *= 0.125f)
        if (mass_at_least(w, n, b) >= needed) {
            bound = b;
            break;
        }
    if (bound == 0.0f)                  /* every weight may be needed: the smallest is a float above 0 */
        bound = float_of(1);
    const int64_t c = collect_at_least(w, n, bound, scratch);
    return bisect(scratch, c, key_of(bound), key_of(above), needed, 1);
}

/* The first token whose running mass (in vocabulary order) passes target: block sums first, then
 * the weights of one block. If rounding leaves the target unreached, the last token with weight. */
static int64_t walk(const float *w, int64_t n, const double *bsum, double target)
{
    double acc = 0.0;
    for (int64_t b = 0; b * BLOCK < n; b++) {
        if (acc + bsum[b] <= target) {
            acc += bsum[b];
            continue;
        }
        const int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        for (int64_t i = b * BLOCK; i < end; i++)
            if (w[i] > 0.0f) {
                acc += (double)w[i];
                if (acc > target)
                    return i;
            }
    }
    int64_t last = n - 1;
    while (last > 0 && !(w[last] > 0.0f))
        last--;
    return last;
}

static int64_t draw_row(const float *x, int64_t n, float temperature, int32_t top_k, double top_p,
                        float log_min_p, double u, float *s, float *scratch, double *bsum)
{
    float max = -INFINITY;
    int nan = 0;
    #pragma omp simd reduction(max:max) reduction(|:nan)
    for (int64_t j = 0; j < n; j++) {
        s[j] = x[j] / temperature;
        nan |= s[j] != s[j];
        max = s[j] > max ? s[j] : max;
    }
    if (nan || !isfinite(max))
        return greedy(x, n);
    float threshold = log_min_p > -INFINITY ? max + log_min_p : -INFINITY;
    if (top_k > 0 && top_k < n) {
        float kth = kth_largest(s, n, max, top_k, scratch);
        threshold = kth > threshold ? kth : threshold;
    }
    double total = weigh(s, n, max, threshold, bsum);
    if (top_p < 1.0) {
        float floor = nucleus_floor(s, n, total, top_p, scratch);
        /* weights below the floor leave: as weights, so a tie with the floor stays */
        for (int64_t j = 0; j < n; j++)
            s[j] = s[j] >= floor ? s[j] : 0.0f;
        total = block_sums(s, n, bsum);
    }
    return walk(s, n, bsum, u * total);
}

int kvos_draw_tokens(const float *logits, int64_t ld, int64_t rows, int64_t vocab, const float *temperature,
                     const int32_t *top_k, const double *top_p, const float *log_min_p, const double *u,
                     int64_t *out)
{
    int failed = 0;
    #pragma omp parallel num_threads(kvos_num_threads()) if (rows > 1) reduction(|:failed)
    {
        float *s = malloc(sizeof(float) * (size_t)vocab), *scratch = malloc(sizeof(float) * (size_t)vocab);
        double *bsum = malloc(sizeof(double) * (size_t)(vocab / BLOCK + 1));
        #pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++) {
            if (!s || !scratch || !bsum) {
                failed = 1;
                continue;
            }
            out[r] = draw_row(logits + r * ld, vocab, temperature[r], top_k[r], top_p[r], log_min_p[r], u[r],
                              s, scratch, bsum);
        }
        free(s);
        free(scratch);
        free(bsum);
    }
    return failed ? KVOS_E_NOMEM : KVOS_OK;
}
