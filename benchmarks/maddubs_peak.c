/* maddubs_peak: the rate one core retires 256-bit vpmaddubsw + vpaddw pairs, the inner operation of
 * qmm's AVX2 4-bit tile (csrc/cpu/qmm.c), with no memory traffic: the ceiling docs/performance.md
 * section 13 measures that kernel against. Four independent chains, each with its own weights so
 * the compiler cannot merge them; one thread, CPU time. Pin it to compare a VM's vCPUs:
 * gcc -O2 benchmarks/maddubs_peak.c -o /tmp/maddubs_peak && taskset -c 0 /tmp/maddubs_peak */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 4
#define ITERS 50000000L

static double cpu_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx2"))) int main(void)
{
    __m256i acc[CHAINS], w[CHAINS], x = _mm256_set1_epi8(1);
    for (int i = 0; i < CHAINS; i++) {
        acc[i] = _mm256_set1_epi32(i);
        w[i] = _mm256_set1_epi8((char)(i + 1));
    }
    double t = cpu_seconds();
    for (long n = 0; n < ITERS; n++) {
#pragma GCC unroll 16
        for (int i = 0; i < CHAINS; i++)
            acc[i] = _mm256_add_epi16(acc[i], _mm256_maddubs_epi16(w[i], x));
        __asm__ volatile("" : "+x"(x));   /* keeps the compiler from folding the loop */
    }
    double dt = cpu_seconds() - t;
    int check = 0;
    for (int i = 0; i < CHAINS; i++)
        check += _mm256_extract_epi32(acc[i], 0);
    printf("vpmaddubsw + vpaddw ymm: %.2f G pairs/s, %.1f G int8 multiply-adds/s (check %d)\n",
           CHAINS * ITERS / dt / 1e9, CHAINS * ITERS * 32.0 / dt / 1e9, check);
    return 0;
}
