"""A program's view of the shared frame pool.

The pool is one uint8 tensor (num_frames, frame_bytes) shared by every tenant.
A frame holds one page of one process for all layers, laid out as
[layer][k|v][token][kv_head][head_dim] in the program's dtype. Models with a
smaller KV size per token fit more tokens in a frame. Programs reach their K and
V through `layer(l)`: strided views (num_frames, page_size, kv_heads, head_dim)
whose frame stride is the pool's, so no copy is made and frames of other
tenants are simply never addressed.
"""
from dataclasses import dataclass

import torch

from kernel.errors import ENOMEM, KvosError


@dataclass(frozen=True)
class KVShape:
    """What a program stores per token: the only model facts the kernel needs."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def tokens_per_frame(self, frame_bytes: int) -> int:
        return frame_bytes // self.bytes_per_token


class KVView:
    """Per-layer (k_cache, v_cache) views of the pool for one KV shape."""

    def __init__(self, pool: torch.Tensor, shape: KVShape):
        num_frames, frame_bytes = pool.shape
        itemsize = torch.empty((), dtype=shape.dtype).element_size()
        if frame_bytes % itemsize:
            raise KvosError(ENOMEM, f"frame of {frame_bytes} bytes does not hold whole {shape.dtype} elements")
        self.shape = shape
        self.page_size = shape.tokens_per_frame(frame_bytes)
        if self.page_size < 1:
            raise KvosError(ENOMEM, f"a frame of {frame_bytes} bytes cannot hold one token "
                                    f"({shape.bytes_per_token} bytes per token)")
        elems = pool.view(shape.dtype)                      # (num_frames, frame_elems)
        frame_stride = elems.stride(0)
        h, d, t = shape.num_kv_heads, shape.head_dim, self.page_size
        size = (num_frames, t, h, d)
        stride = (frame_stride, h * d, d, 1)
        half = t * h * d
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
