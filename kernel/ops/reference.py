"""Plain-torch twins of every compiled op: the oracle the tests compare against.

They define the contract of kernel/ops (shapes, index conventions, semantics)
and run anywhere torch runs. They favour clarity over speed.
"""
import torch

from kernel.kvcache import q8_dequantize, q8_quantize, q8_scales


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Scatter new keys and values into their slots.

    k_cache, v_cache: (num_frames, page_size, kv_heads, head_dim) views of the pool.
    k, v: (num_tokens, kv_heads, head_dim). slot_mapping: int32 (num_tokens,),
    slot = frame * page_size + offset.
    An int8 cache (kernel/kvcache.py) takes each row's codes and its scale (kvcache.q8_quantize).
    """
    page_size = k_cache.shape[1]
    slots = slot_mapping.long()
    frames, offsets = slots // page_size, slots % page_size
    for cache, x in ((k_cache, k), (v_cache, v)):
        if cache.dtype == torch.int8:
            codes, scale = q8_quantize(x)
            cache[frames, offsets] = codes
            q8_scales(cache)[frames, offsets] = scale
        else:
            cache[frames, offsets] = x.to(cache.dtype)


def gather_context(cache, page_row, kv_len):
    """The first kv_len token vectors of one sequence, read through its page table row (an int8
    cache's rows dequantized to float32)."""
    page_size = cache.shape[1]
    num_pages = (kv_len + page_size - 1) // page_size
    frames = page_row[:num_pages].long()
    pages = cache[frames]                                  # (pages, page_size, kv_heads, head_dim)
    if cache.dtype == torch.int8:
        pages = q8_dequantize(pages, q8_scales(cache)[frames])
    return pages.reshape(-1, *cache.shape[2:])[:kv_len]    # (kv_len, kv_heads, head_dim)


def paged_attention(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out=None):
    """Causal attention of packed queries over paged context.

    q: (num_tokens, num_heads, head_dim), the new tokens of every sequence packed
    back to back. Sequence s owns rows query_start[s]:query_start[s+1] (q_len of
    them) and has context_lens[s] tokens of K/V in the cache (its new tokens
    included, written by write_kv first). Query i of s sits at position
    context_lens[s] - q_len + i and attends to positions 0..that position.
    num_heads is a multiple of kv_heads (grouped-query attention).
    Returns out: (num_tokens, num_heads, head_dim) in q's dtype.
    """
    num_heads, kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    if out is None:
        out = torch.empty_like(q)
    starts = query_start.tolist()
    for s, kv_len in enumerate(context_lens.tolist()):
        q_lo, q_hi = starts[s], starts[s + 1]
        q_len = q_hi - q_lo
        if q_len == 0:
            continue
        k = gather_context(k_cache, page_table[s], kv_len).float().repeat_interleave(group, dim=1)
        v = gather_context(v_cache, page_table[s], kv_len).float().repeat_interleave(group, dim=1)
        qs = q[q_lo:q_hi].float()
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
        k_pos = torch.arange(kv_len, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


def copy_frames(pool, src, dst):
    """pool[dst[i]] = pool[src[i]] for every i. pool: uint8 (num_frames, frame_bytes)."""
    pool[dst.long()] = pool[src.long()]


def swap_out(pool, swap, frames, slots):
    """swap[slots[i]] = pool[frames[i]]: device frames to the host swap area."""
    swap[slots.long()] = pool[frames.long()].to(swap.device)


def swap_in(swap, pool, slots, frames):
    """pool[frames[i]] = swap[slots[i]]: host swap slots back into device frames."""
    pool[frames.long()] = swap[slots.long()].to(pool.device)


def int4_dequantize(codes, scale_zeros, group):
    """W (n, k) float32 from int4 codes (n, k) in 0..15 and scale_zeros (k / group, n, 2):
    W[n, j] = (codes[n, j] - 8) * scale + zero of j's group."""
    s = scale_zeros[..., 0].float().t().repeat_interleave(group, dim=1)
    z = scale_zeros[..., 1].float().t().repeat_interleave(group, dim=1)
    return (codes.float() - 8) * s + z


def int4_mm(x, codes, scale_zeros, group):
    """x @ W^T in float32 (the twin of ops.int4_mm, which takes codes packed by ops.int4_pack)."""
    return x.float() @ int4_dequantize(codes, scale_zeros, group).t()


# ---- fused layer ops (kernel/ops/fused.py): float arithmetic, results rounded to the storage dtype ----

def add_rms_norm(residual, delta, weight, eps, out=None):
    """residual += delta (rounded to residual's dtype), then out = RMSNorm(residual) * weight.
    residual, delta, out: (tokens, hidden); weight: (hidden,). Returns out."""
    residual.copy_((residual.float() + delta.float()).to(residual.dtype))
    r = residual.float()
    y = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if out is None:
        out = torch.empty_like(residual)
    out.copy_(y.to(out.dtype))
    return out


def rope(x, cos, sin, positions):
    """Rotate-half RoPE of x (tokens, heads, head_dim) in float: with half = head_dim / 2,
    y[d] = x[d] cos[p][d] - x[d+half] sin[p][d], y[d+half] = x[d+half] cos[p][d+half] + x[d] sin[p][d].
    cos: (positions, head_dim), sin: (positions, head_dim / 2), as userspace's RopeTables holds them."""
    c, s = cos[positions.long()].float()[:, None], sin[positions.long()].float()[:, None]
    x = x.float()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c[..., :half] - x2 * s, x2 * c[..., half:] + x1 * s), dim=-1)


def rope_write_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping):
    """RoPE of q in place and of k at each token's position; the rotated k and v go to their cache
    slots as write_kv writes them (k itself is left as it was)."""
    q.copy_(rope(q, cos, sin, positions).to(q.dtype))
    k_rot = rope(k, cos, sin, positions)
    write_kv(k_cache, v_cache, k_rot if k_cache.dtype == torch.int8 else k_rot.to(k_cache.dtype), v, slot_mapping)


def silu_mul(gate_up, out=None):
    """out = SiLU(gate) * up of gate_up = (tokens, 2 * inter), gate first. Returns out (tokens, inter)."""
    inter = gate_up.shape[-1] // 2
    g, u = gate_up[:, :inter].float(), gate_up[:, inter:].float()
    y = g * torch.sigmoid(g) * u
    if out is None:
        out = torch.empty(gate_up.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    out.copy_(y.to(out.dtype))
    return out


def panel_mm(x, packed, n, bias=None, out=None, accumulate=False):
    """out (m, n) = x @ W^T (+ bias), or out += that; W (n, k) is packed (panels, k, 64) column
    panels (ops.panel_pack), read back here by undoing the packing. On bf16 panels (k-pairs of
    128) x is rounded to bf16 and the products are summed in float64 (the kernel sums in float32)."""
    if packed.dtype == torch.bfloat16:
        panels, kp = packed.shape[:2]
        w = packed.view(panels, kp, 64, 2).transpose(1, 2).reshape(panels * 64, 2 * kp)[:n, :x.shape[1]]
        y = (x.to(torch.bfloat16).double() @ w.double().t()).float()
    else:
        w = packed.transpose(1, 2).reshape(-1, packed.shape[1])[:n]
        y = x.float() @ w.t()
    if bias is not None:
        y = y + bias
    if out is None:
        return y
    if accumulate:
        out += y
    else:
        out.copy_(y)
    return out


def qmm_quantize_rows(x):
    """x float32 (rows, k) -> (codes int8-valued float32, d float32 (rows, k / 32)): per 32-block,
    d = amax / 127 and codes = round-half-even(x / d) (0 where d is 0), as csrc/cpu/qmm.c does."""
    xb = x.float().view(x.shape[0], -1, 32)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1)), 0).clamp_(-127, 127)
    return q.view(x.shape), d.squeeze(-1)


def qmm(x, codes, d, m):
    """The twin of ops.qmm: x (rows, k) quantized as qmm_quantize_rows, W (n, k) = d * codes + m
    per 32-block (d, m as fp16 values), both dequantized and multiplied in float64; float32 out."""
    q, dx = qmm_quantize_rows(x)
    xd = q.double() * dx.double().repeat_interleave(32, dim=1)
    w = codes.double() * d.half().double().repeat_interleave(32, dim=1) + m.half().double().repeat_interleave(32, dim=1)
    return (xd @ w.t()).float()


def qmm_rows(packed: torch.Tensor, ids: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """Twin of ops.qmm_rows: rows ids of the W that qmm_pack packed, d * u + m (product and sum rounded
    apart), gathered from the records by index arithmetic."""
    from kernel.ops.qblocks import BLOCK, NR, code_bytes
    _, blocks, rb = packed.shape
    cb = code_bytes(bits)
    ids = ids.long()
    tile, col = ids // NR, ids % NR
    e = torch.arange(BLOCK)
    j = e // 4
    # element e of a block: vector j = e // 4 (4-bit: vectors j and j + 4 share a byte), byte 4 col + e % 4
    in_record = ((j % 4 if bits == 4 else j) * 64 + e % 4).view(1, 1, BLOCK)
    record = (tile * blocks).view(-1, 1) + torch.arange(blocks).view(1, -1)          # (ids, blocks)
    at = (record * rb).unsqueeze(-1) + in_record + 4 * col.view(-1, 1, 1)              # (ids, blocks, 32)
    u = packed.reshape(-1)[at]
    if bits == 4:
        u = torch.where(j.view(1, 1, BLOCK) < 4, u & 15, u >> 4)
    halves = packed.reshape(-1).view(torch.float16)
    d_at = (record * rb + cb) // 2 + col.view(-1, 1)                                   # NR d, then NR m
    d, m = halves[d_at].float().unsqueeze(-1), halves[d_at + NR].float().unsqueeze(-1)
    return (u.float() * d + m).reshape(ids.shape[0], k)


def draw_weights(logits, temperature, top_k, top_p, log_min_p):
    """The weights draw_tokens draws from: float32 (rows, vocab), 0 where a token may not be drawn.

    Per row (temperature float32 > 0, top_k int32 (0 or >= vocab: no limit), top_p float64 in
    (0, 1], log_min_p float32 (-inf: no min-p)): the scaled logits s = x / T and their max m; a
    threshold t on s, the largest of m + log_min_p and (with top-k) the k-th largest s; the weights
    w = exp(s - m) where s >= t (and s is not -inf), else 0; with top-p, the weights ranked heaviest
    first, the last one kept the first whose mass ranked above it reaches top_p x sum(w), and only
    weights at least that one stay. Every filter keeps the ties at its threshold.
    """
    return _weights(logits, temperature, top_k, top_p, log_min_p)[0]


def _weights(logits, temperature, top_k, top_p, log_min_p):
    """(draw_weights, a bool per row: it has a NaN or no finite max, so it draws its argmax)."""
    vocab = logits.shape[1]
    s = logits.float() / temperature.unsqueeze(1)
    m = s.amax(dim=-1, keepdim=True)
    threshold = m + log_min_p.unsqueeze(1)
    limited = (top_k > 0) & (top_k < vocab)
    if bool(limited.any()):
        k = torch.where(limited, top_k, 1).long()
        kth = s.topk(int(k.max()), dim=-1).values.gather(1, k.unsqueeze(1) - 1)
        threshold = torch.maximum(threshold, torch.where(limited.unsqueeze(1), kth, -torch.inf))
    w = torch.where((s >= threshold) & (s > -torch.inf), torch.exp(s - m), 0.0)
    if bool((top_p < 1.0).any()):
        ranked = w.sort(dim=-1, descending=True).values
        above = ranked.double().cumsum(dim=-1) - ranked.double()
        needed = top_p.unsqueeze(1) * w.double().sum(dim=-1, keepdim=True)
        kept = (above < needed).sum(dim=-1, keepdim=True).clamp(min=1)
        floor = torch.where(top_p.unsqueeze(1) < 1.0, ranked.gather(1, kept - 1), 0.0)
        w = torch.where(w >= floor, w, 0.0)
    return w, torch.isnan(s).any(dim=-1) | ~torch.isfinite(m.squeeze(1))


def draw_tokens(logits, temperature, top_k, top_p, log_min_p, u):
    """One token per row of float logits (rows, vocab), drawn by inverse CDF on the row's uniform
    u (float64 in [0, 1)) over draw_weights: the first token whose running sum of weights, in
    vocabulary order and in float64, passes u x sum(w) (the last token with weight, if rounding
    leaves it unreached). A row with a NaN, an infinite max or nothing finite gets its argmax (the
    first NaN, else the first max), as a greedy row would.
    """
    vocab = logits.shape[1]
    w, bad = _weights(logits, temperature, top_k, top_p, log_min_p)
    cdf = w.double().cumsum(dim=-1)
    token = torch.searchsorted(cdf, u.unsqueeze(1) * cdf[:, -1:], right=True).squeeze(1)
    last = vocab - 1 - (w > 0).flip(-1).int().argmax(dim=-1)
    token = torch.where(token < vocab, token, last)
    if bool(bad.any()):
        token = torch.where(bad, logits.float().argmax(dim=-1), token)
    return token
