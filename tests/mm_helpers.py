"""Shared helpers for memory-manager tests: a pool whose frames hold token ids as data.

Each token slot stores its token id as one int64, so reading a process's frames
back shows whether copy-on-write and swap moved the right bytes.
"""
from dataclasses import asdict

import torch

from kernel.devices.torchdev import TorchDevice
from kernel.mm import MemoryManager

SLOT_BYTES = 8


def make_mm(num_frames=16, page_size=4, swap_slots=8, watermark=0):
    device = TorchDevice("cpu")
    mm = MemoryManager(device, num_frames, page_size * SLOT_BYTES, swap_slots=swap_slots, watermark=watermark)
    mm.device.pool.fill_(0xEE)
    return mm


def write_tokens(mm, slots, tokens):
    """What a forward pass does: store each token's 'K/V' (here its id) in its slot."""
    mm.flush()
    view = mm.device.pool.view(torch.int64).view(-1)
    view[torch.tensor(slots, dtype=torch.long)] = torch.tensor(tokens, dtype=torch.int64)


def append(mm, asid, tokens):
    slots = mm.append(asid, tokens)
    write_tokens(mm, slots, tokens)
    return slots


def read_tokens(mm, asid):
    """Token ids read back from the address space's own frames."""
    mm.flush()
    space = mm.space(asid)
    view = mm.device.pool.view(torch.int64).view(mm.num_frames, -1)
    out = []
    for vpn, frame in enumerate(space.frames):
        n = len(space.page_tokens(vpn))
        out.extend(view[frame, :n].tolist())
    return out


def snapshot(mm):
    """Everything a failed call must leave as it was (statistics of look-ups made are not state)."""
    info = asdict(mm.meminfo())
    info.pop("page_cache_lookups")
    return (
        info,
        {a: asdict(mm.pagemap(a)) for a in mm.spaces},
        {s: asdict(mm.segment_pagemap(s)) for s in mm.segments},
        list(mm.frames.free_list), list(mm.frames.lru), list(mm.swap.free_slots),
        list(mm.pending), {c: cg.charged for c, cg in mm.cgroups.items()},
    )
