"""Rotary position embeddings: frequency tables built once per program.

The tables are computed in float32 exactly as Hugging Face does (so logits
match), cover every position up to the model's context, and are cast to the
compute dtype. A forward pass gathers the rows of its positions once and every
layer reuses them.
"""
from __future__ import annotations

import math

import torch

from userspace.programs.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (head_dim / 2,) inverse frequencies after the model's scaling rule.

    freq_factors: llama.cpp's rope_freqs tensor (GGUF files of LLaMA 3.1 and
    later carry their scaling this way); each frequency is divided by its factor.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float()
    return inv_freq


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """LLaMA 3.1's rule: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RopeTables:
    """cos (positions, head_dim) and sin (positions, head_dim / 2) for every position of the context."""

    def __init__(self, config: LlamaConfig, dtype: torch.dtype, device: torch.device,
                 freq_factors: torch.Tensor | None = None):
        inv_freq = inverse_frequencies(config, freq_factors)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]                     # (positions, head_dim / 2)
        # Both halves of a head share one angle per pair, so sin is kept at half width.
        self.cos = torch.cat((freqs, freqs), dim=-1).cos().to(device=device, dtype=dtype)
        self.sin = freqs.sin().to(device=device, dtype=dtype)
        self.half = config.head_dim // 2

    def lookup(self, positions: torch.Tensor):
        """(cos, sin) rows for packed positions, shaped (tokens, 1, dim) to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE of x (tokens, heads, head_dim) into a new contiguous tensor.

        out = x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1),
        written as one multiply and two in-place multiply-adds on the halves.
        """
        h = self.half
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin, value=-1.0)
        out[..., h:].addcmul_(x[..., :h], sin)
        return out
