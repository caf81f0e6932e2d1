/* kvos_cuda.cuh: what every kvos CUDA kernel needs beside the shared math: the element
 * types (fp32, fp16, bf16 as 16-bit payloads, so no cuda_fp16.h is needed under NVRTC),
 * their conversions to and from float, and 16-byte vector loads. Kernels compute in
 * float whatever the storage type. */
#ifndef KVOS_CUDA_CUH
#define KVOS_CUDA_CUH
#include "kvos_math.h"

struct kvos_half { unsigned short bits; };
struct kvos_bf16 { unsigned short bits; };
struct alignas(16) kvos_16_bytes { unsigned int w[4]; };

__device__ __forceinline__ float kvos_to_float(float x) { return x; }
__device__ __forceinline__ float kvos_to_float(kvos_half h)
{
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
    return f;
#else   /* a host compiler: the CPU emulation of these kernels (csrc/emu) */
    _Float16 v;
    __builtin_memcpy(&v, &h.bits, 2);
    return (float)v;
#endif
}
__device__ __forceinline__ float kvos_to_float(kvos_bf16 h) { return __uint_as_float(((unsigned int)h.bits) << 16); }

template <typename T> __device__ __forceinline__ T kvos_from_float(float x);
template <> __device__ __forceinline__ float kvos_from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ kvos_half kvos_from_float<kvos_half>(float x)
{
    kvos_half h;
#if defined(__CUDA_ARCH__)
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
#else
    _Float16 v = (_Float16)x;
    __builtin_memcpy(&h.bits, &v, 2);
#endif
    return h;
}
template <> __device__ __forceinline__ kvos_bf16 kvos_from_float<kvos_bf16>(float x)
{
    unsigned int u = __float_as_uint(x);
    kvos_bf16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u)
        h.bits = 0x7fc0;                                           /* NaN stays NaN */
    else
        h.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);   /* round to nearest even */
    return h;
}

/* VEC elements from p as floats: one 16-byte load when VEC fills 16 bytes (p aligned),
 * else element by element. */
template <typename T, int VEC>
__device__ __forceinline__ void kvos_load(const T *p, float *f)
{
    if (VEC * sizeof(T) == 16) {
        kvos_16_bytes v = *reinterpret_cast<const kvos_16_bytes *>(p);
        const T *e = reinterpret_cast<const T *>(&v);
#pragma unroll
        for (int i = 0; i < VEC; i++)
            f[i] = kvos_to_float(e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; i++)
            f[i] = kvos_to_float(p[i]);
    }
}

/* cp.async: 16-byte copies global -> shared that run while the thread computes. A thread
 * issues copies, closes them into a group (commit), and waits until at most N of its newest
 * groups are still in flight (wait<N>); copies of other lanes are visible after a __syncwarp
 * or __syncthreads that follows their wait. The CPU emulation (csrc/emu) defers each copy
 * to the wait that retires its group, so reading a stage too early reads stale bytes there
 * too. Both pointers 16-byte aligned. */
__device__ __forceinline__ void kvos_cp_async16(void *shared_dst, const void *global_src)
{
#if defined(__CUDA_ARCH__)
    unsigned long long generic = reinterpret_cast<unsigned long long>(shared_dst), shared;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(shared) : "l"(generic));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)shared), "l"(global_src) : "memory");
#elif defined(KVOS_CUDA_EMU)
    emu_cp_async(shared_dst, global_src, 16);
#endif
}

__device__ __forceinline__ void kvos_cp_async_commit()
{
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.commit_group;" ::: "memory");
#elif defined(KVOS_CUDA_EMU)
    emu_cp_async_commit();
#endif
}

template <int N>
__device__ __forceinline__ void kvos_cp_async_wait()
{
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#elif defined(KVOS_CUDA_EMU)
    emu_cp_async_wait(N);
#endif
}

#endif
