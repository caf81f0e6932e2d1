/* Paged decode attention v2 (flash-decoding): one thread block per (work item, kv head, group
 * of up to 8 query heads), a work item being (query row, chunk of its context). Every warp
 * streams its own tiles of 32 tokens through a private ring of V2_STAGES shared-memory stages
 * filled by cp.async, so loads of the next tiles overlap the math of this one; the frames of a
 * chunk are read from the page table once per page. Scores (a lane per token), the online
 * softmax and P V (a lane per slice of d) stay in registers; the warps' states are merged in
 * shared memory at the end. With more than one chunk a row's chunks are written as partial
 * states and merged by attention.cu's kvos_attention_combine_*. Same math as v1 (kvos_math.h). */
#include "kvos_cuda.cuh"
#include "attention_args.cuh"

#define V2_TILE 32      /* tokens per warp tile: one per lane in the score step */
#define V2_HEADS 8      /* query heads a block holds (a GQA group, or 8 of a wider one) */
#define V2_WARPS_MAX 4
#ifndef V2_STAGES
#define V2_STAGES 2     /* tiles in flight per warp (the one computed on included) */
#endif

struct attn_v2_args {
    attn_args a;          /* the v1 struct: the combine kernel reads it as it is */
    const int32_t *work;  /* (items, 2): (query row, chunk); row < 0 is padding. Null: item i is
                           * (i / num_partitions, i % num_partitions), the dense grid */
};

/* Byte offsets of the shared-memory regions of a block; kernel/ops/cuda_decode.py computes the
 * same (a test compares them). The warps' final states reuse the ring once it is drained. */
struct v2_smem { int64_t frames, q, off, p, ring, total; };

__host__ __device__ inline int64_t v2_round16(int64_t x) { return (x + 15) / 16 * 16; }
/* A row of K or V in shared memory: padded by 16 bytes, so the 32 lanes of a warp reading
 * 32 rows at one column fall in different banks. */
__host__ __device__ inline int64_t v2_row_bytes(int64_t head_dim, int64_t itemsize)
{
    return v2_round16(head_dim * itemsize) + 16;
}

__host__ __device__ inline v2_smem v2_layout(int64_t warps, int64_t head_dim, int64_t itemsize,
                                             int64_t chunk, int64_t page_size)
{
    v2_smem l;
    int64_t at = 0;
    l.frames = at; at += v2_round16(4 * (chunk / page_size + 2));   /* frames of the pages a chunk spans */
    l.q = at;      at += v2_round16(4 * V2_HEADS * head_dim);          /* scaled queries, float */
    l.off = at;    at += 8 * warps * V2_TILE;                         /* per warp: its tile's row offsets */
    l.p = at;      at += 4 * warps * V2_HEADS * V2_TILE;              /* per warp: the tile's weights */
    l.ring = at;   at += warps * V2_STAGES * 2 * V2_TILE * v2_row_bytes(head_dim, itemsize);
    l.total = at;
    return l;
}

namespace kvos_v2 {

__device__ __forceinline__ float warp_max(float x)
{
    for (int o = 16; o > 0; o >>= 1)
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x)
{
    for (int o = 16; o > 0; o >>= 1)
        x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

/* DPL consecutive elements, aligned to their size (rows in shared memory start 16-byte aligned and
 * a lane's slice starts at lane * DPL), so that the compiler reads them with one vector load. */
template <typename T, int N>
struct alignas(N * sizeof(T) < 16 ? N * sizeof(T) : 16) Slice { T e[N]; };

/* Where a warp's tiles live and how its K/V rows are found. */
template <typename T>
struct Ring {
    T *stages;            /* V2_STAGES x (K tile, V tile), rows of rs elements */
    int64_t *off;         /* element offset of each token of the tile being issued */
    const int32_t *frames;
    int64_t rs, t0, p0;   /* row stride in elements; the chunk's first token and first page */
    int n, tiles, warp, warps;
};

/* Start the copies of the warp's k-th tile into stage k % V2_STAGES and close them into a
 * group; past the last tile the group is empty, so that every iteration waits alike. */
template <typename T, bool ASYNC>
__device__ __forceinline__ void issue(const attn_args &a, const Ring<T> &r, int k, int lane, int h)
{
    if (k < r.tiles) {
        const int tt0 = (r.warp + k * r.warps) * V2_TILE;
        const int nt = r.n - tt0 < V2_TILE ? r.n - tt0 : V2_TILE;
        T *ks = r.stages + (int64_t)(k % V2_STAGES) * 2 * V2_TILE * r.rs, *vs = ks + V2_TILE * r.rs;
        if (lane < nt) {   /* a lane per token; the page's frame comes from shared memory */
            const int64_t pos = r.t0 + tt0 + lane;
            r.off[lane] = (int64_t)r.frames[pos / a.page_size - r.p0] * a.frame_stride
                        + (pos % a.page_size) * a.token_stride + (int64_t)h * a.head_stride;
        }
        __syncwarp();
        const T *kc = static_cast<const T *>(a.k_cache), *vc = static_cast<const T *>(a.v_cache);
        if (ASYNC) {   /* 16-byte pieces; consecutive lanes take consecutive pieces of a row */
            const int per_row = a.head_dim * (int)sizeof(T) / 16, vec = 16 / (int)sizeof(T);
            for (int i = lane; i < nt * per_row; i += 32) {
                const int t = i / per_row, c = (i % per_row) * vec;
                kvos_cp_async16(ks + t * r.rs + c, kc + r.off[t] + c);
                kvos_cp_async16(vs + t * r.rs + c, vc + r.off[t] + c);
            }
        } else {       /* rows not 16-byte aligned: element copies through registers */
            for (int i = lane; i < nt * a.head_dim; i += 32) {
                const int t = i / a.head_dim, d = i % a.head_dim;
                ks[t * r.rs + d] = kc[r.off[t] + d];
                vs[t * r.rs + d] = vc[r.off[t] + d];
            }
        }
        __syncwarp();   /* off[] is rewritten by the next issue */
    }
    kvos_cp_async_commit();
}

template <typename T, int VEC, int DPL>
__device__ void decode_attention(const attn_v2_args &args, char *base)
{
    const attn_args &a = args.a;
    const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int D = a.head_dim, chunk_size = a.partition_size;

    int row, chunk;
    if (args.work) {
        row = args.work[2 * blockIdx.x];
        chunk = args.work[2 * blockIdx.x + 1];
    } else {
        row = blockIdx.x / a.num_partitions;
        chunk = blockIdx.x % a.num_partitions;
    }
    if (row < 0)
        return;   /* padding of a fixed-size work list */
    const int32_t s = kvos_seq_of_row(a.query_start, a.num_seqs, row);
    const int64_t q_len = a.query_start[s + 1] - a.query_start[s];
    const int64_t n_ctx = kvos_query_pos(a.context_lens[s], q_len, row - a.query_start[s]) + 1;
    const int64_t t0 = (int64_t)chunk * chunk_size;
    if (t0 >= n_ctx)
        return;   /* past the row's context: the combine kernel never reads this chunk */
    const int n = (int)(n_ctx - t0 < chunk_size ? n_ctx - t0 : chunk_size);
    const int h = blockIdx.y, g0 = blockIdx.z * V2_HEADS;
    const int GB = a.group - g0 < V2_HEADS ? a.group - g0 : V2_HEADS;

    const v2_smem L = v2_layout(warps, D, sizeof(T), chunk_size, a.page_size);
    int32_t *frames_s = reinterpret_cast<int32_t *>(base + L.frames);
    float *q_s = reinterpret_cast<float *>(base + L.q);

    /* Address translation once per page: the chunk's frames, for every warp. */
    const int64_t p0 = t0 / a.page_size, pages = (t0 + n - 1) / a.page_size - p0 + 1;
    const int32_t *page_row = a.page_table + (int64_t)s * a.page_table_stride;
    for (int i = threadIdx.x; i < pages; i += blockDim.x)
        frames_s[i] = page_row[p0 + i];
    const T *q = static_cast<const T *>(a.q) + (int64_t)row * a.q_tok_stride;
    for (int i = threadIdx.x; i < GB * D; i += blockDim.x)
        q_s[i] = kvos_to_float(q[(int64_t)(h * a.group + g0 + i / D) * a.q_head_stride + i % D]) * a.q_scale;
    __syncthreads();

    Ring<T> r;
    r.rs = v2_row_bytes(D, sizeof(T)) / sizeof(T);
    r.stages = reinterpret_cast<T *>(base + L.ring) + (int64_t)warp * V2_STAGES * 2 * V2_TILE * r.rs;
    r.off = reinterpret_cast<int64_t *>(base + L.off) + warp * V2_TILE;
    r.frames = frames_s;
    r.t0 = t0;
    r.p0 = p0;
    r.n = n;
    r.warp = warp;
    r.warps = warps;
    const int all_tiles = (n + V2_TILE - 1) / V2_TILE;
    r.tiles = all_tiles > warp ? (all_tiles - warp + warps - 1) / warps : 0;   /* tiles warp, warp + warps, ... */
    float *p_w = reinterpret_cast<float *>(base + L.p) + warp * V2_HEADS * V2_TILE;
    constexpr bool ASYNC = VEC * sizeof(T) == 16;

    float m[V2_HEADS], l[V2_HEADS], acc[V2_HEADS][DPL];
#pragma unroll
    for (int g = 0; g < V2_HEADS; g++) {
        m[g] = KVOS_NEG_BIG;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < DPL; e++)
            acc[g][e] = 0.0f;
    }
    const int d0 = lane * DPL;

    for (int k = 0; k < V2_STAGES - 1; k++)
        issue<T, ASYNC>(a, r, k, lane, h);
    for (int k = 0; k < r.tiles; k++) {   /* warp-uniform trip count */
        issue<T, ASYNC>(a, r, k + V2_STAGES - 1, lane, h);
        kvos_cp_async_wait<V2_STAGES - 1>();   /* this lane's copies of tile k have landed */
        __syncwarp();                          /* and every other lane's */
        const int tt0 = (warp + k * warps) * V2_TILE, nt = n - tt0 < V2_TILE ? n - tt0 : V2_TILE;
        const T *ks = r.stages + (int64_t)(k % V2_STAGES) * 2 * V2_TILE * r.rs, *vs = ks + V2_TILE * r.rs;

        /* Scores: lane t takes token t against the block's query heads. */
        float sc[V2_HEADS];
#pragma unroll
        for (int g = 0; g < V2_HEADS; g++)
            sc[g] = 0.0f;
        if (lane < nt) {
            const T *kr = ks + lane * r.rs;
            for (int c = 0; c < D; c += VEC) {
                float kf[VEC];
                kvos_load<T, VEC>(kr + c, kf);
#pragma unroll
                for (int g = 0; g < V2_HEADS; g++)
                    if (g < GB) {
                        if constexpr (ASYNC) {   /* 16-byte rows: D % 4 == 0, q's rows 16-byte aligned */
                            float qf[VEC];
                            const float *qc = q_s + g * D + c;
#pragma unroll
                            for (int j = 0; j < VEC; j += 4) {   /* float4 loads, not VEC scalar ones */
                                const Slice<float, 4> v = *reinterpret_cast<const Slice<float, 4> *>(qc + j);
#pragma unroll
                                for (int e = 0; e < 4; e++)
                                    qf[j + e] = v.e[e];
                            }
                            sc[g] += kvos_dot(kf, qf, VEC);
                        } else {
                            sc[g] += kvos_dot(kf, q_s + g * D + c, VEC);
                        }
                    }
            }
        }
        /* Online softmax per head: the tile's max by shuffles; each lane keeps a partial sum
         * of its own tokens' weights (all lanes rescale alike, so they add up at the end). */
#pragma unroll
        for (int g = 0; g < V2_HEADS; g++) {
            if (g >= GB)
                break;
            const float x = lane < nt ? sc[g] : KVOS_NEG_BIG;
            const float alpha = kvos_softmax_rescale(&m[g], warp_max(x));
            const float p = lane < nt ? kvos_exp2(x - m[g]) : 0.0f;
            l[g] = l[g] * alpha + p;
#pragma unroll
            for (int e = 0; e < DPL; e++)
                acc[g][e] *= alpha;
            p_w[g * V2_TILE + lane] = p;
        }
        __syncwarp();
        /* P V: lane owns d0..d0+DPL; the weights are broadcast reads of shared memory. */
        if (d0 < D) {
            for (int t = 0; t < nt; t++) {
                const T *vr = vs + t * r.rs + d0;
                float vf[DPL];
                if (d0 + DPL <= D) {   /* one aligned load of the lane's DPL elements */
                    const Slice<T, DPL> v = *reinterpret_cast<const Slice<T, DPL> *>(vr);
#pragma unroll
                    for (int e = 0; e < DPL; e++)
                        vf[e] = kvos_to_float(v.e[e]);
                } else {
#pragma unroll
                    for (int e = 0; e < DPL; e++)
                        vf[e] = d0 + e < D ? kvos_to_float(vr[e]) : 0.0f;
                }
#pragma unroll
                for (int g = 0; g < V2_HEADS; g++) {
                    if (g >= GB)
                        break;
                    const float p = p_w[g * V2_TILE + t];
#pragma unroll
                    for (int e = 0; e < DPL; e++)
                        acc[g][e] += p * vf[e];
                }
            }
        }
        __syncwarp();   /* the stage and p_w are refilled next iteration */
    }
    kvos_cp_async_wait<0>();

    /* Merge the warps' states in shared memory (over the drained rings). */
    __syncthreads();
    float *mm = reinterpret_cast<float *>(base + L.ring), *ll = mm + warps * V2_HEADS, *aa = ll + warps * V2_HEADS;
#pragma unroll
    for (int g = 0; g < V2_HEADS; g++) {
        if (g >= GB)
            break;
        const float total = warp_sum(l[g]);
        if (lane == 0) {
            mm[warp * V2_HEADS + g] = m[g];
            ll[warp * V2_HEADS + g] = total;
        }
#pragma unroll
        for (int e = 0; e < DPL; e++)
            if (d0 + e < D)
                aa[(int64_t)(warp * V2_HEADS + g) * D + d0 + e] = acc[g][e];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < GB * D; i += blockDim.x) {
        const int g = i / D, d = i % D, head = h * a.group + g0 + g;
        float mx = KVOS_NEG_BIG;
        for (int w = 0; w < warps; w++)
            mx = fmaxf(mx, mm[w * V2_HEADS + g]);
        float sum = 0.0f, x = 0.0f;
        for (int w = 0; w < warps; w++) {
            const float f = kvos_exp2(mm[w * V2_HEADS + g] - mx);   /* 0 for a warp that had no tile */
            sum += ll[w * V2_HEADS + g] * f;
            x += aa[(int64_t)(w * V2_HEADS + g) * D + d] * f;
        }
        if (a.num_partitions == 1) {
            T *o = static_cast<T *>(a.out) + (int64_t)row * a.out_tok_stride + (int64_t)head * a.out_head_stride;
            o[d] = kvos_from_float<T>(x / sum);
        } else {
            const int64_t state = ((int64_t)row * a.num_heads + head) * a.num_partitions + chunk;
            a.part_acc[state * D + d] = x;
            if (d == 0) {
                a.part_m[state] = mx;
                a.part_l[state] = sum;
            }
        }
    }
}

}  // namespace kvos_v2

/* Entry points: dtype x (cp.async of 16-byte pieces, or element copies for unaligned rows) x
 * head size bound (DPL elements of d per lane: 64, 128 or 256). */
#define KVOS_DECODE(suffix, T, VEC) \
    extern "C" __global__ void __launch_bounds__(32 * V2_WARPS_MAX) kvos_decode_attention_##suffix##_d64(attn_v2_args a) \
    { extern __shared__ int64_t smem[]; kvos_v2::decode_attention<T, VEC, 2>(a, reinterpret_cast<char *>(smem)); } \
    extern "C" __global__ void __launch_bounds__(32 * V2_WARPS_MAX) kvos_decode_attention_##suffix##_d128(attn_v2_args a) \
    { extern __shared__ int64_t smem[]; kvos_v2::decode_attention<T, VEC, 4>(a, reinterpret_cast<char *>(smem)); } \
    extern "C" __global__ void __launch_bounds__(32 * V2_WARPS_MAX) kvos_decode_attention_##suffix##_d256(attn_v2_args a) \
    { extern __shared__ int64_t smem[]; kvos_v2::decode_attention<T, VEC, 8>(a, reinterpret_cast<char *>(smem)); }
KVOS_DECODE(f32, float, 4)
KVOS_DECODE(f16, kvos_half, 8)
KVOS_DECODE(bf16, kvos_bf16, 8)
KVOS_DECODE(f32_unaligned, float, 1)
KVOS_DECODE(f16_unaligned, kvos_half, 1)
KVOS_DECODE(bf16_unaligned, kvos_bf16, 1)
