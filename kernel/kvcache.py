"""A program's view of the shared frame pool.

The pool is one uint8 tensor (num_frames, frame_bytes) shared by every tenant.
A frame holds one page of one process for all layers, laid out as
[layer][k|v][token][kv_head][head_dim] in the program's dtype. Models with a
smaller KV size per token fit more tokens in a frame. Programs reach their K and
V through `layer(l)`: strided views (num_frames, page_size, kv_heads, head_dim)
whose frame stride is the pool's, so no copy is made and frames of other
tenants are simply never addressed.

An int8 cache (dtype torch.int8) stores each (token, kv_head) row as head_dim
int8 codes followed by their float32 scale (x ~ code * scale, scale = amax / 127),
so a row is head_dim + 4 bytes (68 at head_dim 64, against float32's 256). The
views cover the codes; `q8_scales` gives the scales beside them, and
`q8_quantize` / `q8_dequantize` are the torch twin of what the C kernels store
and read (csrc/cpu/q8.h).
"""
from dataclasses import dataclass

import torch

from kernel.errors import EINVAL, ENOMEM, KvosError

Q8_SCALE_BYTES = 4     # the float32 scale after each int8 row's codes


@dataclass(frozen=True)
class KVShape:
    """What a program stores per token: the only model facts the kernel needs. dtype torch.int8
    means rows of int8 codes with a float32 scale each (the module's header)."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self):
        if self.dtype == torch.int8 and self.head_dim % Q8_SCALE_BYTES:
            raise KvosError(EINVAL, f"an int8 KV cache needs a head_dim that is a multiple of {Q8_SCALE_BYTES} "
                                    f"(its scales are float32), not {self.head_dim}")

    @property
    def row_bytes(self) -> int:
        """One (token, kv_head) row of K or of V, scale included."""
        if self.dtype == torch.int8:
            return self.head_dim + Q8_SCALE_BYTES
        return self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.row_bytes

    def tokens_per_frame(self, frame_bytes: int) -> int:
        return frame_bytes // self.bytes_per_token


class KVView:
    """Per-layer (k_cache, v_cache) views of the pool for one KV shape."""

    def __init__(self, pool: torch.Tensor, shape: KVShape):
        num_frames, frame_bytes = pool.shape
        itemsize = torch.empty((), dtype=shape.dtype).element_size()
        if frame_bytes % itemsize:
            raise KvosError(ENOMEM, f"frame of {frame_bytes} bytes does not hold whole {shape.dtype} elements")
        if shape.dtype == torch.int8 and frame_bytes % Q8_SCALE_BYTES:
            raise KvosError(ENOMEM, f"frame of {frame_bytes} bytes would misalign an int8 cache's float32 scales "
                                    f"(frames of a multiple of {Q8_SCALE_BYTES} bytes hold them)")
        self.shape = shape
        self.page_size = shape.tokens_per_frame(frame_bytes)
        if self.page_size < 1:
            raise KvosError(ENOMEM, f"a frame of {frame_bytes} bytes cannot hold one token "
                                    f"({shape.bytes_per_token} bytes per token)")
        elems = pool.view(shape.dtype)                      # (num_frames, frame_elems)
        frame_stride = elems.stride(0)
        h, d, t = shape.num_kv_heads, shape.head_dim, self.page_size
        row = shape.row_bytes // itemsize                  # elements: an int8 row's scale follows its codes
        size = (num_frames, t, h, d)
        stride = (frame_stride, h * row, row, 1)
        half = t * h * row
        # Layer l's K starts 2l halves into a frame's elements, its V one half later: from one layer's
        # caches to the next is layer_stride elements (the C layer loop addresses them so).
        self.layer_stride = 2 * half
        self._layers = [
            (elems.as_strided(size, stride, elems.storage_offset() + (2 * l) * half),
             elems.as_strided(size, stride, elems.storage_offset() + (2 * l + 1) * half))
            for l in range(shape.num_layers)
        ]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def layer(self, index: int):
        return self._layers[index]


def q8_scales(cache: torch.Tensor) -> torch.Tensor:
    """The float32 scales (num_frames, page_size, kv_heads) of an int8 cache view from KVView: each
    sits in the 4 bytes after its row's codes, so this is a strided view of the same pool bytes."""
    frames, page, heads, d = cache.shape
    strides = cache.stride()[:3]
    offset = cache.storage_offset() + d
    if cache.dtype != torch.int8 or strides[2] < d + Q8_SCALE_BYTES or any(
            x % Q8_SCALE_BYTES for x in (*strides, offset)):
        raise KvosError(EINVAL, f"not an int8 cache of rows with their scales: {cache.dtype} "
                                f"{tuple(cache.shape)} strides {cache.stride()}")
    return torch.empty(0, dtype=torch.float32, device=cache.device).set_(
        cache.untyped_storage(), offset // Q8_SCALE_BYTES, (frames, page, heads),
        tuple(x // Q8_SCALE_BYTES for x in strides))


def q8_quantize(x: torch.Tensor):
    """Rows x (..., head_dim) float -> (codes int8, scale float32 (...)): scale = amax / 127,
    code = round-half-even(x / scale) clamped to +-127, 0 where the scale is 0 (csrc/cpu/q8.h). A NaN in
    a row makes its scale NaN here, where the C max skips it: a row with a NaN is garbage either way."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127
    s = scale.unsqueeze(-1)
    codes = torch.where(s > 0, torch.round(x / torch.where(s > 0, s, 1)), 0).clamp_(-127, 127)
    return codes.to(torch.int8), scale


def q8_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 rows code * scale (one rounding, as the C kernels widen them)."""
    return codes.float() * scale.unsqueeze(-1)
