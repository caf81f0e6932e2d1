/* kernels_emu.cpp: csrc/cuda's kernels, compiled for the CPU under cuda_emu.h, behind one
 * C entry point shaped like cuLaunchKernel (kernel name, grid, block, shared bytes, an
 * array of pointers to the arguments). tests/test_ops_cuda.py builds it with g++ and
 * drives kernel/ops/cuda.py through it, so the CUDA sources and their Python launcher are
 * checked against the torch twins on machines without a GPU. */
#include "cuda_emu.h"
#include "attention.cu"
#include "attention_v2.cu"
#include "write_kv.cu"
#include "frames.cu"
#include "fused.cu"
#include "qmm.cu"

#include <ucontext.h>
#include <cstddef>
#include <cstring>
#include <deque>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
int64_t smem[1 << 16];   /* 512 KiB of "shared memory", more than any launch asks for */

/* Probes of the emulator's own cp.async model (tests/test_ops_cuda_decode.py): thread i copies
 * src[4i..4i+4) into shared memory, then reads it back into out[i] before (wait_first 0) or
 * after (1) waiting for it; with wait_last 0 it never waits at all. */
extern "C" __global__ void emu_probe_cp_async(float *out, const float *src, int wait_first, int wait_last)
{
    float *stage = reinterpret_cast<float *>(smem) + 4 * threadIdx.x;
    kvos_cp_async16(stage, src + 4 * threadIdx.x);
    kvos_cp_async_commit();
    if (wait_first)
        kvos_cp_async_wait<0>();
    out[threadIdx.x] = stage[0];
    if (wait_last)
        kvos_cp_async_wait<0>();
}

namespace {

enum State { RUN, AT_WARP, AT_BLOCK, DONE };
struct Copy {
    void *dst;
    const void *src;
    std::size_t bytes;
};
struct Thread {
    ucontext_t ctx;
    std::vector<char> stack;
    State state;
    std::vector<Copy> open;                      /* cp.async copies not yet committed */
    std::deque<std::vector<Copy>> committed;     /* groups in flight, oldest first */
};

std::vector<Thread> threads;
ucontext_t scheduler;
int current;
std::function<void()> body;
float lanes[32][32];   /* __shfl_xor_sync exchange: [warp][lane] */

void run_thread()
{
    body();
    threads[current].state = DONE;
    swapcontext(&threads[current].ctx, &scheduler);
}

void wait_at(State s)
{
    threads[current].state = s;
    swapcontext(&threads[current].ctx, &scheduler);
}

template <typename... A, std::size_t... I>
void call(void (*f)(A...), void **p, std::index_sequence<I...>)
{
    f(*static_cast<typename std::remove_reference<A>::type *>(p[I])...);
}

template <typename... A>
std::function<void(void **)> kernel(void (*f)(A...))
{
    return [f](void **p) { call(f, p, std::index_sequence_for<A...>{}); };
}

struct Entry {
    const char *name;
    std::function<void(void **)> fn;
};

const std::vector<Entry> &registry()
{
    static const std::vector<Entry> entries = {
        {"kvos_paged_attention_f32", kernel(kvos_paged_attention_f32)},
        {"kvos_paged_attention_f16", kernel(kvos_paged_attention_f16)},
        {"kvos_paged_attention_bf16", kernel(kvos_paged_attention_bf16)},
        {"kvos_paged_attention_f32_unaligned", kernel(kvos_paged_attention_f32_unaligned)},
        {"kvos_paged_attention_f16_unaligned", kernel(kvos_paged_attention_f16_unaligned)},
        {"kvos_paged_attention_bf16_unaligned", kernel(kvos_paged_attention_bf16_unaligned)},
#define KVOS_DECODE_ENTRIES(suffix) \
        {"kvos_decode_attention_" #suffix "_d64", kernel(kvos_decode_attention_##suffix##_d64)}, \
        {"kvos_decode_attention_" #suffix "_d128", kernel(kvos_decode_attention_##suffix##_d128)}, \
        {"kvos_decode_attention_" #suffix "_d256", kernel(kvos_decode_attention_##suffix##_d256)},
        KVOS_DECODE_ENTRIES(f32) KVOS_DECODE_ENTRIES(f16) KVOS_DECODE_ENTRIES(bf16)
        KVOS_DECODE_ENTRIES(f32_unaligned) KVOS_DECODE_ENTRIES(f16_unaligned) KVOS_DECODE_ENTRIES(bf16_unaligned)
#undef KVOS_DECODE_ENTRIES
        {"kvos_attention_combine_f32", kernel(kvos_attention_combine_f32)},
        {"kvos_attention_combine_f16", kernel(kvos_attention_combine_f16)},
        {"kvos_attention_combine_bf16", kernel(kvos_attention_combine_bf16)},
#define KVOS_FUSED_ENTRIES(suffix) \
        {"kvos_add_rms_norm_" #suffix, kernel(kvos_add_rms_norm_##suffix)}, \
        {"kvos_rope_write_kv_" #suffix, kernel(kvos_rope_write_kv_##suffix)}, \
        {"kvos_silu_mul_" #suffix, kernel(kvos_silu_mul_##suffix)},
        KVOS_FUSED_ENTRIES(f32) KVOS_FUSED_ENTRIES(f16) KVOS_FUSED_ENTRIES(bf16)
#undef KVOS_FUSED_ENTRIES
        {"emu_probe_cp_async", kernel(emu_probe_cp_async)},
        {"kvos_write_kv_b32", kernel(kvos_write_kv_b32)},
        {"kvos_write_kv_b16", kernel(kvos_write_kv_b16)},
        {"kvos_copy_frames_16", kernel(kvos_copy_frames_16)},
        {"kvos_copy_frames_1", kernel(kvos_copy_frames_1)},
        {"kvos_qmm_quantize", kernel(kvos_qmm_quantize)},
        {"kvos_qmm_blocks", kernel(kvos_qmm_blocks)},
    };
    return entries;
}

/* Run one block to completion. 0: done; 2: a barrier some threads never reach;
 * 3: a shuffle with lanes that have exited; 5: a thread ended with cp.async copies it never
 * waited for. */
int run_block(unsigned n)
{
    const std::size_t stack_bytes = 256 * 1024;
    if (threads.size() < n)
        threads.resize(n);
    std::memset(smem, 0xff, sizeof smem);   /* unwritten shared memory reads as NaN */
    for (unsigned i = 0; i < n; i++) {
        threads[i].stack.resize(stack_bytes);
        getcontext(&threads[i].ctx);
        threads[i].ctx.uc_stack.ss_sp = threads[i].stack.data();
        threads[i].ctx.uc_stack.ss_size = stack_bytes;
        threads[i].ctx.uc_link = nullptr;
        makecontext(&threads[i].ctx, run_thread, 0);
        threads[i].state = RUN;
        threads[i].open.clear();
        threads[i].committed.clear();
    }
    for (;;) {
        for (unsigned i = 0; i < n; i++)
            if (threads[i].state == RUN) {
                current = (int)i;
                threadIdx.x = i;
                swapcontext(&scheduler, &threads[i].ctx);
            }
        bool all_done = true, released = false;
        for (unsigned w = 0; w * 32 < n; w++) {
            unsigned at_warp = 0, done = 0, members = 0;
            for (unsigned i = w * 32; i < n && i < w * 32 + 32; i++, members++) {
                at_warp += threads[i].state == AT_WARP;
                done += threads[i].state == DONE;
            }
            if (at_warp && at_warp + done == members) {
                if (done)
                    return 3;
                for (unsigned i = w * 32; i < n && i < w * 32 + 32; i++)
                    threads[i].state = RUN;
                released = true;
            }
        }
        unsigned at_block = 0, done = 0;
        for (unsigned i = 0; i < n; i++) {
            at_block += threads[i].state == AT_BLOCK;
            done += threads[i].state == DONE;
        }
        all_done = done == n;
        if (all_done) {
            for (unsigned i = 0; i < n; i++)
                if (!threads[i].open.empty() || !threads[i].committed.empty())
                    return 5;
            return 0;
        }
        if (!released && at_block + done == n) {
            for (unsigned i = 0; i < n; i++)
                if (threads[i].state == AT_BLOCK)
                    threads[i].state = RUN;
            released = true;
        }
        if (!released)
            return 2;
    }
}

}  // namespace

void __syncthreads() { wait_at(AT_BLOCK); }

float __shfl_xor_sync(unsigned, float x, int lane_mask)
{
    const int warp = current / 32, lane = current % 32;
    lanes[warp][lane] = x;
    wait_at(AT_WARP);
    const float y = lanes[warp][lane ^ lane_mask];
    wait_at(AT_WARP);   /* nobody overwrites lanes[] before every lane has read */
    return y;
}

void __syncwarp(unsigned) { wait_at(AT_WARP); }

void emu_cp_async(void *shared_dst, const void *global_src, std::size_t bytes)
{
    threads[current].open.push_back({shared_dst, global_src, bytes});
}

void emu_cp_async_commit()
{
    Thread &t = threads[current];
    t.committed.push_back(std::move(t.open));
    t.open.clear();
}

void emu_cp_async_wait(int newest_in_flight)
{
    Thread &t = threads[current];
    while (t.committed.size() > (std::size_t)newest_in_flight) {
        for (const Copy &c : t.committed.front())
            std::memcpy(c.dst, c.src, c.bytes);
        t.committed.pop_front();
    }
}

/* Byte offsets of struct attn_v2_args's fields (the wrapped attn_args as one), then its size. */
extern "C" int emu_attn_v2_args_layout(std::size_t *out)
{
    out[0] = offsetof(attn_v2_args, a);
    out[1] = offsetof(attn_v2_args, work);
    out[2] = sizeof(attn_v2_args);
    return 3;
}

/* v2's shared-memory layout (region offsets and total bytes), for the launcher's twin of it. */
extern "C" void emu_v2_layout(int64_t warps, int64_t head_dim, int64_t itemsize, int64_t chunk, int64_t page_size,
                              int64_t *out)
{
    const v2_smem l = v2_layout(warps, head_dim, itemsize, chunk, page_size);
    out[0] = l.frames; out[1] = l.q; out[2] = l.off; out[3] = l.p; out[4] = l.ring; out[5] = l.total;
}

/* Byte offsets of struct attn_args's fields, in declaration order, then its size: the
 * tests compare them with kernel/ops/cuda.py's ATTN_ARGS, which packs it for launches. */
extern "C" int emu_attn_args_layout(std::size_t *out)
{
    std::size_t i = 0;
#define KVOS_FIELD(f) out[i++] = offsetof(attn_args, f);
    KVOS_FIELD(out) KVOS_FIELD(out_tok_stride) KVOS_FIELD(out_head_stride) KVOS_FIELD(q) KVOS_FIELD(q_tok_stride)
    KVOS_FIELD(q_head_stride) KVOS_FIELD(k_cache) KVOS_FIELD(v_cache) KVOS_FIELD(page_size) KVOS_FIELD(frame_stride)
    KVOS_FIELD(token_stride) KVOS_FIELD(head_stride) KVOS_FIELD(page_table) KVOS_FIELD(page_table_stride)
    KVOS_FIELD(query_start) KVOS_FIELD(context_lens) KVOS_FIELD(num_seqs) KVOS_FIELD(num_heads) KVOS_FIELD(group)
    KVOS_FIELD(head_dim) KVOS_FIELD(q_scale) KVOS_FIELD(partition_size) KVOS_FIELD(num_partitions)
    KVOS_FIELD(part_m) KVOS_FIELD(part_l) KVOS_FIELD(part_acc)
#undef KVOS_FIELD
    out[i++] = sizeof(attn_args);
    return (int)i;
}

/* Launch `name` over grid (gx, gy, gz) of blocks of bx threads. Returns 0, 1 for an
 * unknown kernel, 2, 3 or 5 for divergent barriers or shuffles or unwaited copies (see run_block), 4 when
 * the request is beyond the emulator (more than 1024 threads or 512 KiB shared). */
extern "C" int emu_launch(const char *name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          std::size_t shared_bytes, void **params)
{
    const Entry *entry = nullptr;
    for (const Entry &e : registry())
        if (std::strcmp(e.name, name) == 0)
            entry = &e;
    if (!entry)
        return 1;
    if (bx > 1024 || shared_bytes > sizeof smem)
        return 4;
    body = [entry, params]() { entry->fn(params); };
    gridDim.x = gx; gridDim.y = gy; gridDim.z = gz;
    blockDim.x = bx;
    for (unsigned z = 0; z < gz; z++)
        for (unsigned y = 0; y < gy; y++)
            for (unsigned x = 0; x < gx; x++) {
                blockIdx.x = x; blockIdx.y = y; blockIdx.z = z;
                int rc = run_block(bx);
                if (rc)
                    return rc;
            }
    return 0;
}
