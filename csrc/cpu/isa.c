/* isa.c: which vector paths the C kernels may take. Each kernel picks its fastest path for the
 * CPU at run time (AVX-512 with VNNI or bf16 dot products, AVX2 + FMA, portable C); the cap
 * lowers that choice for the whole process, so that the tests run the AVX2 paths on an AVX-512
 * machine and the portable ones anywhere, against the same torch twins. 0: no cap. */
#include "kvos_cpu.h"

static int isa_cap = KVOS_ISA_BEST;

void kvos_set_isa_cap(int cap) { isa_cap = cap; }

int kvos_isa_cap(void) { return isa_cap; }

int kvos_cpu_avx512(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return isa_cap == KVOS_ISA_BEST && __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

int kvos_cpu_avx2(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return isa_cap <= KVOS_ISA_AVX2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}
