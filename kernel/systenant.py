"""Tenant syscalls: spawn_tenant, kill_tenant, tenantinfo, tokenize, detokenize, shmget, shmrm.

spawn_tenant loads its program in the caller's context (seconds for a real model),
so loading never stops the kernel. tokenize and detokenize take no kernel lock at
all: a tenant's program is read-only, shared text, and turning text into token ids
is the caller's work. shmget prefills a shared prefix once and pins it; pinned
frames count against the tenant's guaranteed share of the pool.
"""
from __future__ import annotations

import dataclasses
import re

from kernel.argcheck import (
    check_fits,
    check_int,
    check_number,
    check_room_for,
    is_chat,
    prompt_tokens,
    segment_of,
    tenant_of,
)
from kernel.chat import open_final_message_text
from kernel.errors import EINVAL, ENOMEM, ESRCH, KvosError
from kernel.results import TenantInfo
from kernel.systable import syscall
from kernel.tenant import DEFAULT_MAX_BLOCKED, DEFAULT_MAX_PROCS, DEFAULT_MAX_QUEUED, NICE_MAX, NICE_MIN

RESERVED_NAMES = frozenset({"root", "kernel"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# -- tenants ----------------------------------------------------------------------------------------------
def spawn_tenant_prepare(kernel, caller, model, *, name=None, mem_limit=None, weight=1, prefix_sharing="tenant",
                         max_procs=DEFAULT_MAX_PROCS, max_queued=DEFAULT_MAX_QUEUED,
                         max_blocked=DEFAULT_MAX_BLOCKED, nice_min=NICE_MIN, max_prompt_tokens=None,
                         max_new_tokens=None, cache_salt=None):
    if name is not None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise KvosError(EINVAL, f"name must be 1 to 64 letters, digits, '.', '_' or '-' (not first), "
                                    f"got {name!r}")
        if name.lower() in RESERVED_NAMES:
            raise KvosError(EINVAL, f"tenant name {name!r} is reserved")
    check_number("weight", weight, 1e-6, 1e6)
    if prefix_sharing not in ("tenant", "global"):
        raise KvosError(EINVAL, f"prefix_sharing must be 'tenant' or 'global', got {prefix_sharing!r}")
    if cache_salt is not None:
        if not isinstance(cache_salt, str) or not 1 <= len(cache_salt) <= 256:
            raise KvosError(EINVAL, f"cache_salt must be a string of 1 to 256 characters, got {cache_salt!r:.80}")
        if prefix_sharing == "global":
            raise KvosError(EINVAL, "cache_salt goes with prefix_sharing='tenant' (a global namespace has no salt)")
    check_int("max_procs", max_procs, 1, 1 << 20)
    check_int("max_queued", max_queued, 1, 1 << 20)
    check_int("max_blocked", max_blocked, 1, 1 << 16)
    check_int("nice_min", nice_min, NICE_MIN, NICE_MAX)
    for key, value in (("max_prompt_tokens", max_prompt_tokens), ("max_new_tokens", max_new_tokens)):
        if value is not None:
            check_int(key, value, 1, 1 << 30)
    from kernel.program import exec_program  # torch: loaded by kernels, not by daemon clients
    return dict(program=exec_program(model, kernel.device), name=name, mem_limit=mem_limit, weight=weight,
                prefix_sharing=prefix_sharing, max_procs=max_procs, max_queued=max_queued,
                max_blocked=max_blocked, nice_min=nice_min, max_prompt_tokens=max_prompt_tokens,
                max_new_tokens=max_new_tokens, cache_salt=cache_salt)


@syscall("spawn_tenant", root_only=True, new_work=True, prepare=spawn_tenant_prepare)
def sys_spawn_tenant(kernel, caller, program, name, **limits):
    """Load a model program (weights shared with tenants already running it) and create its cgroup. -> tid

    Limits: mem_limit (bytes), max_procs (processes held, zombies included until waited for),
    max_queued (waiting for admission), max_blocked (blocking calls in flight), nice_min (the
    lowest priority value its processes may take), max_prompt_tokens and max_new_tokens (per
    process; default the model's context). cache_salt: a secret string that salts the tenant's page
    names, so that kernels given the same salt name the same prefixes alike (replicas of one
    tenant behind a router); by default each tenant's salt is random. A salt another tenant of
    the same program holds here is refused. The program loads before the kernel lock is taken."""
    if name is not None and any(t.name == name for t in kernel.tenants.values()):
        raise KvosError(EINVAL, f"a tenant named {name!r} exists")
    return kernel.create_tenant(program, name, **limits).tid


@syscall("kill_tenant", root_only=True)
def sys_kill_tenant(kernel, caller, tid):
    """End every process of a tenant, remove its segments and its cgroup; its keys stop working."""
    kernel.remove_tenant(tenant_of(kernel, caller, tid))


@syscall("tenantinfo")
def sys_tenantinfo(kernel, caller, tid):
    """A tenant's limits and its program's facts (vocabulary, context, EOS ids, page size). -> TenantInfo"""
    t = tenant_of(kernel, caller, tid)
    p = t.program
    return TenantInfo(t.tid, t.name, p.name, p.vocab_size, p.max_context, sorted(p.eos_token_ids),
                      getattr(p, "bos_token_id", None), t.page_size, p.kv_shape.bytes_per_token,
                      getattr(p, "render_chat", None) is not None and _has_template(p), t.weight,
                      t.mem_limit, t.max_procs, t.max_queued, t.max_blocked, t.max_prompt_tokens,
                      t.max_new_tokens, t.nice_min, t.prefix_sharing, _dtype(p.kv_shape.dtype),
                      _dtype(getattr(p, "matmul_dtype", None) or p.kv_shape.dtype), getattr(p, "chat_tools", None),
                      t.namespace.hex(), _cost(p), dict(getattr(p, "special_tokens", None) or {}),
                      getattr(p, "chat_template", None))


def _cost(program) -> dict | None:
    cost = getattr(program, "cost", None)
    return dataclasses.asdict(cost) if dataclasses.is_dataclass(cost) else None


def _dtype(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _has_template(program) -> bool:
    try:
        program.render_chat([{"role": "user", "content": "x"}])
        return True
    except KvosError:
        return False


# -- text (no kernel lock: the caller's work) ------------------------------------------------------------------
@syscall("tokenize", locked=False)
def sys_tokenize(kernel, caller, tid, prompt, add_generation_prompt=True, tools=None, continue_final_message=False):
    """Token ids of text, or of a chat (list of {role, content}) in the model's template, as spawn
    would run them (add_generation_prompt applies to chats; tools=[...] are given to the chat's
    template, as spawn gives them). continue_final_message=True (with add_generation_prompt=False)
    leaves the chat's last message open, its content the end of the text, for the model to continue.
    Runs without the kernel lock. -> [int]"""
    tenant = tenant_of(kernel, caller, tid)
    for name, value in (("add_generation_prompt", add_generation_prompt),
                        ("continue_final_message", continue_final_message)):
        if not isinstance(value, bool):
            raise KvosError(EINVAL, f"{name} must be True or False, got {value!r}")
    if continue_final_message:
        if not is_chat(prompt):
            raise KvosError(EINVAL, "continue_final_message goes with a chat prompt (a list of messages)")
        if add_generation_prompt:
            raise KvosError(EINVAL, "continue_final_message and add_generation_prompt cannot both be true: "
                                    "the final message is either continued or followed by the model's turn")
    if is_chat(prompt) and not add_generation_prompt:
        prompt_tokens(tenant.program, prompt, tools=tools)     # validates the messages and the tools
        if continue_final_message:
            return list(tenant.program.encode(open_final_message_text(tenant.program, list(prompt), tools)))
        return list(tenant.program.apply_chat_template(list(prompt), add_generation_prompt=False, tools=tools))
    if isinstance(prompt, str) and not prompt and tools is None:
        return []
    return list(prompt_tokens(tenant.program, prompt, tools=tools))


@syscall("detokenize", locked=False)
def sys_detokenize(kernel, caller, tid, token_ids):
    """Text of token ids in the tenant's tokenizer (special tokens skipped). Runs without the kernel
    lock. -> str"""
    tenant = tenant_of(kernel, caller, tid)
    if isinstance(token_ids, (list, tuple)) and not token_ids:
        return ""
    tenant.program.check_tokens(token_ids, "token_ids")
    return tenant.program.decode(list(token_ids))


# -- shared prefixes ----------------------------------------------------------------------------------------------
def shmget_prepare(kernel, caller, tid, prompt):
    tenant = tenant_of(kernel, caller, tid)
    return dict(tenant=tenant, ids=prompt_tokens(tenant.program, prompt, tenant=tenant))


@syscall("shmget", new_work=True, prepare=shmget_prepare)
def sys_shmget(kernel, caller, tenant, ids):
    """Prefill `prompt` once and pin it as a shared prefix; spawn(..., shm=shmid) attaches it. -> shmid

    Pinned frames count against the tenant's guaranteed share of the pool (its limit, or its
    weight's fraction of the pool among all tenants): a segment beyond it is refused (ENOMEM)."""
    if not tenant.alive:
        raise KvosError(ESRCH, f"tenant {tenant.tid} no longer exists")
    check_fits(kernel, tenant, len(ids), "segment")
    check_room_for(kernel, tenant, 1)
    pages = -(-len(ids) // tenant.page_size)
    pinned = kernel.pinned_frames(tenant)
    share = kernel.guaranteed_frames(tenant)
    if pinned + pages > share:
        raise KvosError(ENOMEM, f"segment of {pages} frames: tenant {tenant.name!r} pins {pinned} and is "
                                f"guaranteed {share} of the pool's {kernel.mm.num_frames}")
    return kernel.create_segment(tenant, ids).shmid


@syscall("shmrm")
def sys_shmrm(kernel, caller, shmid):
    """Unpin a shared prefix; processes attached to it keep their pages."""
    kernel.remove_segment(segment_of(kernel, caller, shmid))
