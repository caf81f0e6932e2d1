/* cuda_emu.h: just enough of the CUDA execution model, on the CPU, to run csrc/cuda's
 * kernels unmodified in tests on machines without a GPU. A block's threads are
 * coroutines on one OS thread; __syncthreads and __shfl_xor_sync are barriers (block and
 * warp) at which the scheduler switches, and a barrier that not all threads reach is
 * reported as a deadlock (divergent code), as it would hang a GPU. Blocks run one by one.
 * cp.async is modelled as deferred synchronous copies: an issued copy is queued in the
 * thread's open group, commit closes the group, and wait_group(N) performs the copies of
 * all but the N newest groups, so a kernel that reads a stage before waiting for it reads
 * stale bytes (shared memory starts as NaN) and fails its test; a thread that ends with
 * copies never waited for is reported. No timing or overlap is modelled.
 * Tests only: slow (a context switch per thread per barrier), never a serving path. */
#ifndef KVOS_CUDA_EMU_H
#define KVOS_CUDA_EMU_H
#include <cmath>
#include <cstdint>
#include <cstddef>
#include <cstring>

struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };
extern emu_dim3 threadIdx, blockIdx, blockDim, gridDim;   /* of the thread now running */

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define KVOS_CUDA_EMU 1

/* Dynamic shared memory of the block now running (`extern __shared__ int64_t smem[]`). */
extern int64_t smem[];

void __syncthreads();
float __shfl_xor_sync(unsigned mask, float x, int lane_mask);
void __syncwarp(unsigned mask = 0xffffffffu);
void emu_cp_async(void *shared_dst, const void *global_src, std::size_t bytes);
void emu_cp_async_commit();
void emu_cp_async_wait(int newest_in_flight);

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
using std::exp2f;
using std::fmaxf;

#endif
