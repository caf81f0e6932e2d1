/* vnni_peak: the rate one core retires 512-bit vpdpbusd (and vfmadd231ps for comparison), the
 * ceiling docs/performance.md section 8c measures qmm against. Twelve independent accumulator
 * chains, more than latency x throughput, so only the issue rate limits (the loops are unrolled so
 * the chains live in registers: check with objdump that 12 vpdpbusd appear); one thread, CPU time.
 * Build and run: gcc -O2 -march=native benchmarks/vnni_peak.c -o /tmp/vnni_peak && /tmp/vnni_peak */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 12
#define ITERS 100000000L

static double cpu_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) int main(void)
{
    __m512i acc[CHAINS], w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(1);
    for (int i = 0; i < CHAINS; i++)
        acc[i] = _mm512_set1_epi32(i);
    double t = cpu_seconds();
    for (long n = 0; n < ITERS; n++) {
#pragma GCC unroll 32
        for (int i = 0; i < CHAINS; i++)
            acc[i] = _mm512_dpbusd_epi32(acc[i], w, x);
        __asm__ volatile("" : "+v"(w));   /* keeps the compiler from folding the loop */
    }
    double dt = cpu_seconds() - t;
    int check = 0;
    for (int i = 0; i < CHAINS; i++)
        check += _mm512_reduce_add_epi32(acc[i]);
    printf("vpdpbusd zmm: %.2f G/s, %.1f G int8 multiply-adds/s (check %d)\n", CHAINS * ITERS / dt / 1e9,
           CHAINS * ITERS * 64.0 / dt / 1e9, check);

    __m512 f[CHAINS], b = _mm512_set1_ps(0.5f);
    for (int i = 0; i < CHAINS; i++)
        f[i] = _mm512_set1_ps((float)i);
    t = cpu_seconds();
    for (long n = 0; n < ITERS; n++) {
#pragma GCC unroll 32
        for (int i = 0; i < CHAINS; i++)
            f[i] = _mm512_fmadd_ps(f[i], b, b);     /* converges to 1: stays finite */
        __asm__ volatile("" : "+v"(b));
    }
    dt = cpu_seconds() - t;
    float fcheck = 0.0f;
    for (int i = 0; i < CHAINS; i++)
        fcheck += _mm512_reduce_add_ps(f[i]);
    printf("vfmadd231ps zmm: %.2f G/s (check %.1f)\n", CHAINS * ITERS / dt / 1e9, fcheck);
    return 0;
}
