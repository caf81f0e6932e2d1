"""Argument checks shared by the syscall handlers: each raises KvosError before anything changes."""
import math

from kernel.errors import E2BIG, EAGAIN, EINVAL, ENOMEM, EPERM, ESRCH, KvosError
from kernel.tenant import NICE_MAX, NICE_MIN


def check_int(name, value, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise KvosError(EINVAL, f"{name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise KvosError(EINVAL, f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_number(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or \
            value < lo or (hi is not None and value > hi) or math.isinf(value):
        raise KvosError(EINVAL, f"{name} must be a number in [{lo}, {hi if hi is not None else 'inf'}), got {value!r}")
    return float(value)


MAX_TIMEOUT = 86_400.0        # seconds a blocking call may be asked to wait (one day)


def check_timeout(timeout, default):
    """A blocking call's timeout: None (no limit) only where `default` is None, else seconds in
    [0, MAX_TIMEOUT]."""
    if timeout is None and default is None:
        return None
    if timeout is None:
        timeout = default
    return check_number("timeout", timeout, 0.0, MAX_TIMEOUT)


def tenant_of(kernel, caller, tid):
    check_int("tid", tid)
    tenant = kernel.tenants.get(tid)
    if tenant is None:
        raise KvosError(ESRCH, f"no tenant {tid}")
    if caller is not None and caller is not tenant:
        raise KvosError(EPERM, f"tenant {caller.tid} may not use tenant {tid}")
    return tenant


def segment_of(kernel, owner, shmid, name="shmid"):
    """The shm segment `shmid`, which must belong to `owner` (None: root, any segment)."""
    check_int(name, shmid)
    seg = kernel.shm_segments.get(shmid)
    if seg is None:
        raise KvosError(ESRCH, f"no shm segment {shmid}")
    if owner is not None and seg.tenant is not owner:
        raise KvosError(EPERM, f"shm segment {shmid} belongs to another tenant")
    return seg


def proc_of(kernel, caller, pid):
    check_int("pid", pid)
    proc = kernel.procs.get(pid)
    if proc is None:
        raise KvosError(ESRCH, f"no process {pid}")
    if caller is not None and proc.tenant is not caller:
        raise KvosError(EPERM, f"process {pid} belongs to another tenant")
    return proc


MAX_TOOLS_BYTES = 64 * 1024   # the tools of one chat, as JSON
MAX_SCHEMA_BYTES = 64 * 1024  # a json_schema's JSON text, or a grammar's (compiled in the caller's context)
MAX_BAD_WORDS = 256           # bad_words_ids sequences a process may ban: bounded work per draw
MAX_BAD_WORD_TOKENS = 32      # tokens in one of them
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


def prompt_tokens(program, prompt, what="prompt", tenant=None, tools=None):
    """Token ids of a prompt: text, a list of token ids, or a chat (list of {role, content}, and for
    tool conversations tool_calls / tool_call_id), with `tools` given to the chat's template.

    Runs in the caller's context (a syscall's prepare half): tokenizing costs the caller only.
    With `tenant`, text that cannot fit its limit is refused before it is tokenized."""
    if tools is not None and not is_chat(prompt):
        raise KvosError(EINVAL, "tools go with a chat prompt (a list of messages)")
    if isinstance(prompt, str):
        if not prompt:
            raise KvosError(EINVAL, f"{what} is empty")
        _refuse_long_text(program, tenant, _utf8_length(prompt, what), what)
        ids = program.encode(prompt)
    elif is_chat(prompt):
        for m in prompt:
            if set(m) - MESSAGE_KEYS or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise KvosError(EINVAL, f"{what}: a chat message needs string 'role' and 'content', got {m!r}")
            if not isinstance(m.get("tool_calls", []), list) or not isinstance(m.get("tool_call_id", ""), str):
                raise KvosError(EINVAL, f"{what}: a message's tool_calls is a list, its tool_call_id a string")
        size = sum(_utf8_length(m["content"], what) for m in prompt) + _tools_length(prompt, tools)
        _refuse_long_text(program, tenant, size, what)
        text = program.render_chat(list(prompt), tools=tools) if tools else program.render_chat(list(prompt))
        _refuse_long_text(program, tenant, _utf8_length(text, what), what)     # the template may add far more
        ids = program.encode(text)
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        program.check_tokens(ids, what)
    else:
        raise KvosError(EINVAL, f"{what} must be text, a list of token ids or a chat, got {type(prompt).__name__}")
    if not ids:
        raise KvosError(EINVAL, f"{what} is empty")
    return ids


def _tools_length(messages, tools) -> int:
    """Bytes of a chat's tools and tool calls as JSON (EINVAL if they are not JSON, or too many)."""
    import json
    calls = [m["tool_calls"] for m in messages if m.get("tool_calls")]
    if tools is None and not calls:
        return 0
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise KvosError(EINVAL, f"tools must be a list of tool objects, got {type(tools).__name__}")
    try:
        size = len(json.dumps([tools, calls], allow_nan=False).encode())
    except (TypeError, ValueError) as err:
        raise KvosError(EINVAL, f"tools and tool calls must be JSON: {err}") from None
    if size > MAX_TOOLS_BYTES:
        raise KvosError(EINVAL, f"tools and tool calls may have at most {MAX_TOOLS_BYTES} bytes of JSON, got {size}")
    return size


def is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _utf8_length(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise KvosError(EINVAL, f"{what} is not valid text: {err.reason}") from None


def _refuse_long_text(program, tenant, num_bytes: int, what: str) -> None:
    """E2BIG (ENOMEM past the context) for text that holds more tokens than the tenant's limit
    whatever the tokenizer does: a token spells at most program.max_token_bytes bytes, so text
    has at least num_bytes / that many tokens. A 10 MB prompt is refused without being tokenized."""
    longest = getattr(program, "max_token_bytes", None)
    if tenant is None or not longest:
        return
    at_least = -(-num_bytes // longest)
    if at_least > tenant.max_prompt_tokens:
        errno = ENOMEM if at_least >= program.max_context else E2BIG
        raise KvosError(errno, f"{what} of {num_bytes} bytes is at least {at_least} tokens; tenant "
                               f"{tenant.name!r}'s limit is {tenant.max_prompt_tokens}")


def check_fits(kernel, tenant, num_tokens, what):
    if num_tokens > tenant.max_prompt_tokens and num_tokens < tenant.program.max_context:
        raise KvosError(E2BIG, f"{what} of {num_tokens} tokens exceeds tenant {tenant.name!r}'s limit "
                               f"of {tenant.max_prompt_tokens}")
    if num_tokens >= tenant.program.max_context:
        raise KvosError(ENOMEM, f"{what} of {num_tokens} tokens does not fit the model's context "
                                f"of {tenant.program.max_context}")
    pages = -(-(num_tokens + 1) // tenant.page_size)
    frames = kernel.mm.num_frames - kernel.mm.frames.num_pinned
    if pages > frames:
        raise KvosError(ENOMEM, f"{what} of {num_tokens} tokens needs {pages} frames; the pool has {frames}")
    if tenant.mem_limit is not None and pages > tenant.mem_limit:
        raise KvosError(ENOMEM, f"{what} of {num_tokens} tokens needs {pages} frames; tenant "
                                f"{tenant.name!r} may use {tenant.mem_limit}")


def check_room_for(kernel, tenant, n):
    """EAGAIN unless `n` more processes fit the tenant's limits. Zombies count until they are
    reaped (as RLIMIT_NPROC counts them): a tenant that never waits cannot grow the table."""
    held = len(tenant.pids)
    if held + n > tenant.max_procs:
        raise KvosError(EAGAIN, f"tenant {tenant.name!r} holds {held} processes (zombies included until "
                                f"waited for); its limit is {tenant.max_procs}")
    queued = kernel.sched.queued.get(tenant.tid, 0)
    if queued + n > tenant.max_queued:
        raise KvosError(EAGAIN, f"tenant {tenant.name!r} has {queued} processes waiting; its queue limit is "
                                f"{tenant.max_queued}")


def check_priority(tenant, caller, priority):
    check_int("priority", priority, NICE_MIN, NICE_MAX)
    if caller is not None and priority < tenant.nice_min:
        raise KvosError(EPERM, f"priority {priority} is below tenant {tenant.name!r}'s floor {tenant.nice_min}")
    return priority
