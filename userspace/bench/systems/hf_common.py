"""What the two transformers baselines share: the model from the same GGUF, fp32, and its sizes.
On a cuda device (options["device"]) the model is moved there after loading; still fp32.

transformers dequantizes the GGUF's Q4_1 tensors to float32 itself (the same values kvos
loads), so both run the same weights; its load takes about a minute on two cores, timed
apart from the run.
"""
from __future__ import annotations

import time
from pathlib import Path


def load_model(options, attn_implementation: str | None = None):
    """(model, seconds) for options["gguf"], float32, eval mode, torch threads set."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(options["threads"])
    path = Path(options["gguf"])
    started = time.perf_counter()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 **kwargs).eval()
    device = options.get("device", "cpu")
    if device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False       # fp32 arithmetic, as the kvos row's
        model = model.to(device)
    # EOS ends nothing in this benchmark: every system generates the prescribed lengths.
    model.generation_config.eos_token_id = None
    return model, time.perf_counter() - started


def kv_bytes_per_token(model) -> int:
    """K and V of one token, every layer, float32."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4


def pad_token_id(model) -> int:
    c = model.config
    for value in (c.pad_token_id, c.eos_token_id, 0):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0
