"""What syscalls return: plain dataclasses, JSON-ready with dataclasses.asdict.

The one public module of result types: the kernel builds them, userspace (the
daemon's wire format, the TUI, the shell, libc) reads them, and neither needs
the kernel's machinery to do so. The daemon's client rebuilds the same classes
from JSON (userspace/daemon/wire.py), so code written against an in-process
handle works unchanged over HTTP.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ExitStatus", "ReadResult", "TokenLogprob", "TopLogprob", "ProcInfo", "TenantInfo", "SystemInfo",
           "FsckReport", "WorkRecord", "StepRecord", "TenantSched", "SchedStat", "LoopStatus", "PageEntry", "PageMap",
           "CgroupInfo", "MemInfo", "LogEntry", "CacheEvent"]


# -- processes ------------------------------------------------------------------------------------------
@dataclass
class ExitStatus:
    pid: int
    reason: str              # "stop", "length", "killed", "error"
    tokens: list             # generated token ids (all turns)
    text: str                # their text, each turn cut before the stop string that ended it
    prompt_tokens: int
    error: str | None = None
    time_to_first_token: float | None = None
    elapsed: float = 0.0
    accepted_prediction_tokens: int = 0   # spawned with a prediction: its drafts the draws kept
    rejected_prediction_tokens: int = 0   # and those they did not (their rows were computed anyway)


@dataclass
class ReadResult:
    pid: int
    tokens: list                 # token ids generated since the last read
    text: str                    # their text (held back while a character is incomplete)
    state: str
    turn_done: bool              # the current turn ended (the process sleeps or exited)
    finish_reason: str | None
    logprobs: list = field(default_factory=list)   # [TokenLogprob] per new token (spawned with logprobs=k)
    prompt_logprobs: list | None = None   # [TokenLogprob] per prompt token, once (spawned with prompt_logprobs=k)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (its raw logits: before penalties, a
    grammar's mask and temperature), and at its position the `logprobs` most likely tokens. A turn
    that generates nothing (max_tokens 0) reports its next position: token and logprob None."""
    token: int | None
    logprob: float | None
    bytes: list                  # what the token adds to the output, as byte values
    text: str                    # those bytes decoded alone (half a character shows as U+FFFD)
    top: list = field(default_factory=list)        # [TopLogprob], most likely first
    rank: int | None = None      # 1 + how many tokens were more likely at its position (None without a token)


@dataclass
class TopLogprob:
    """One of the most likely tokens at a generated token's position."""
    token: int
    logprob: float
    bytes: list
    text: str


@dataclass
class ProcInfo:
    pid: int
    tid: int
    tenant: str
    state: str
    residency: str
    priority: int
    prompt_tokens: int
    generated_tokens: int
    computed_tokens: int
    pages: int
    shared_pages: int
    swapped_pages: int
    cow_faults: int
    preemptions: int
    tokens_per_second: float
    time_to_first_token: float | None
    replica: int | None = None   # the replica it runs on, behind a cluster gateway (None: one kernel)


# -- tenants and their programs ------------------------------------------------------------------------
@dataclass
class TenantInfo:
    """A tenant's limits and the facts of the program it runs (what clients need to prepare input)."""
    tid: int
    name: str
    model: str                   # the program's name
    vocab_size: int
    max_context: int             # tokens the model attends over
    eos_token_ids: list
    bos_token_id: int | None
    page_size: int               # tokens per frame for this program
    kv_bytes_per_token: int
    has_chat_template: bool
    weight: float
    mem_limit: int | None        # frames
    max_procs: int
    max_queued: int
    max_blocked: int             # blocking calls (wait, read with a timeout) in flight at once
    max_prompt_tokens: int
    max_new_tokens: int
    nice_min: int
    prefix_sharing: str
    kv_dtype: str = "float32"    # what the KV cache stores
    matmul_dtype: str = "float32"  # what the linear layers compute in
    chat_tools: str | None = None  # the chat template's tools: None (takes none), "hermes" (<tool_call>), "other"
    page_namespace: str = ""     # hex root of its page names' chain (kernel.pagename.chain_names)
    # What one forward pass costs (the program's ProgramCost as a dict: num_params, weight_bytes read per
    # step, num_layers, hidden_size, num_heads, head_dim): a client's roofline of its own steps.
    cost: dict | None = None
    # What a client needs to tokenize or render as the model does: its special tokens' text by role
    # ({"bos_token": ..., "eos_token": ...}) and its chat template (Jinja text), when it has them.
    special_tokens: dict = field(default_factory=dict)
    chat_template: str | None = None


@dataclass
class SystemInfo:
    """uname: the kernel's version, its device and how it was booted."""
    version: str
    device: str                  # "cpu", "cuda:0", "sim:a100-80g"
    device_kind: str             # "cpu", "cuda", "sim"
    policy: str
    page_size: int               # tokens per page for the first tenant's model
    token_budget: int
    chunk: int
    max_running: int
    frame_bytes: int             # 0 until the first tenant sizes the pool
    memory_bytes: int            # KV memory (0 until sized)
    swap_bytes: int
    gpu: dict | None = None      # the simulated GPU's constants
    memory_budget: dict | None = None   # the simulated device's KV arithmetic for the first program


@dataclass
class FsckReport:
    """fsck: every invariant held (a broken one is a KernelPanic instead). Counts of what was checked."""
    frames: int
    processes: int
    address_spaces: int
    segments: int


# -- the scheduler ----------------------------------------------------------------------------------------
@dataclass(slots=True)       # a step record holds hundreds of these
class WorkRecord:
    """One process's share of a step."""
    pid: int
    tid: int
    start: int                   # index in its token file of the first token computed
    count: int                   # tokens computed
    token: int | None            # the token sampled at the end of the step, if any
    generated: int               # tokens generated so far (all turns), after this step


@dataclass(slots=True)
class StepRecord:
    """One time slice: what ran, and what the kernel did to make room for it.

    trace() returns these whole; schedstat().recent_steps without the per-process lists."""
    step: int
    seconds: float               # wall time (or simulated time) of the step
    batch_size: int              # processes that computed tokens
    prefill_tokens: int
    decode_tokens: int
    padding_tokens: int
    ended_at: float = 0.0        # the kernel's clock at the end of the step (seconds since boot)
    running: int = 0             # processes on the run queue after the step
    waiting: int = 0             # processes waiting for admission after the step
    frames_free: int = 0         # free frames after the step (cached ones not counted)
    works: list = field(default_factory=list)         # [WorkRecord]
    admitted: list = field(default_factory=list)      # pids
    swapped_in: list = field(default_factory=list)    # pids
    preempted: list = field(default_factory=list)     # [pid, "swap" | "reclaim"]
    cow_faults: list = field(default_factory=list)    # pids that copied a shared page this step
    exits: list = field(default_factory=list)         # [pid, reason] of processes that ended this step
    waiting_by_tenant: dict = field(default_factory=dict)   # tid -> processes waiting after the step
    cost: dict | None = None     # the simulated device's price of the step, term by term
    replica: int | None = None   # the replica that ran it, behind a cluster gateway (None: one kernel)



@dataclass
class TenantSched:
    tid: int
    name: str
    weight: float
    served_tokens: int
    running: int
    waiting: int
    sleeping: int
    model: str = ""                  # what the tenant runs (tenantinfo() has the program's facts)
    eos_token_ids: list = field(default_factory=list)
    vocab_size: int = 0
    max_context: int = 0
    page_size: int = 0               # tokens per frame for this model


@dataclass
class SchedStat:
    """Root sees the whole scheduler; a tenant sees its own counters only (the global fields are 0)."""
    policy: str
    steps: int
    busy_seconds: float
    prefill_tokens: int
    decode_tokens: int
    cached_tokens: int
    generated_tokens: int
    padding_tokens: int
    admissions: int
    preemptions: int
    swap_outs: int
    swap_ins: int
    reclaims: int
    recomputed_tokens: int
    exits: int
    oom_kills: int
    forward_errors: int
    tokens_per_second: float
    running: int
    waiting: int
    tenants: list
    recent_steps: list           # the last StepRecord summaries (root only)
    clock: float = 0.0           # the kernel's clock now (seconds since boot; virtual on the simulator)
    replicas: dict | None = None  # behind a cluster gateway: replica -> its own SchedStat (the rest sums them)
    draft_tokens: int = 0        # tokens computed on speculation (boot's speculate=k)
    accepted_tokens: int = 0     # of those, the ones the draws matched


@dataclass
class LoopStatus:
    """The kernel's loop thread (loopctl)."""
    running: bool                # a loop thread steps the kernel
    paused: bool                 # it waits for loopctl("resume") or ("step")
    steps: int                   # steps taken since boot
    idle_seconds: float | None   # how long it has found nothing to run, None while busy
    error: str | None            # what stopped it, if a kernel bug did


# -- /proc for memory --------------------------------------------------------------------------------
@dataclass
class PageEntry:
    vpn: int                 # virtual page number
    frame: int | None        # device frame, None when swapped
    swap_slot: int | None    # host swap slot, None when resident
    refcount: int            # references to the frame (page tables + segments)
    tokens: list             # token ids the page holds
    shared: bool             # more than one reference
    cow: bool                # shared and partly filled: the next append here faults
    cached: bool             # named in the page cache (a full page)
    swapped: bool
    pinned: bool             # mapped by a shm segment
    text: str | None = None  # the tokens as text, when pagemap(text=True) asked for it

    @property
    def flags(self) -> str:
        """Compact flags as in /proc: s shared, c copy-on-write, n named (cached), w swapped, p pinned."""
        return "".join(c if on else "-" for c, on in (
            ("s", self.shared), ("c", self.cow), ("n", self.cached), ("w", self.swapped), ("p", self.pinned)))


@dataclass
class PageMap:
    page_size: int
    num_tokens: int
    pages: list = field(default_factory=list)


@dataclass
class CgroupInfo:
    name: str
    charged: int             # frames charged
    limit: int | None
    pinned: int = 0          # of them, frames its shm segments pin
    share: int | None = None  # frames it is guaranteed (its weight's fraction of the pool, or its limit)


@dataclass
class MemInfo:
    frame_bytes: int
    total: int               # frames in the pool
    free: int
    cached: int              # unreferenced, named, reclaimable
    mapped: int              # referenced by page tables or segments
    shared: int              # mapped with more than one reference
    pinned: int              # mapped by shm segments
    watermark: int
    swap_total: int          # swap slots
    swap_used: int
    cow_faults: int
    page_cache_hits: int
    page_cache_evictions: int
    swapped_out_pages: int
    swapped_in_pages: int
    tokens_stored: int       # tokens held in mapped frames (a shared page counts once)
    token_capacity: int      # tokens the mapped frames could hold
    cgroups: dict = field(default_factory=dict)
    page_cache_lookups: int = 0
    frames: list | None = None   # meminfo(frames=True): per frame [state, refcount, cgroup name or None, [pids]]
    replicas: dict | None = None  # behind a cluster gateway: replica -> its own MemInfo (the rest sums them)

    @property
    def utilization(self) -> float:
        """KV memory utilisation: tokens stored over the token capacity of mapped frames."""
        return self.tokens_stored / self.token_capacity if self.token_capacity else 0.0


# -- the kernel log -------------------------------------------------------------------------------------
@dataclass
class LogEntry:
    seq: int
    time: float              # seconds since boot
    step: int
    level: str               # "info", "warn", "error"
    event: str               # short kind: "spawn", "admit", "preempt", "swap-in", "exit", "oom", ...
    message: str
    tid: int | None = None   # tenant the event belongs to (None: the kernel's own)
    pid: int | None = None
    replica: int | None = None   # the replica that logged it, behind a cluster gateway (None: one kernel)


# -- the page cache's events ----------------------------------------------------------------------------
@dataclass
class CacheEvent:
    """A page entering (publish) or leaving (evict) a kernel's page cache, for prefix-aware routers."""
    seq: int                 # 1, 2, ... in order; a gap after `since` says the ring lost events
    kind: str                # "publish" or "evict"
    page: str                # the page's name, hex (kernel.pagename)
    parent: str              # its parent's name (the namespace for a first page), hex
    tid: int | None = None   # the tenant whose namespace it is (None: no live tenant has it)
    replica: int | None = None   # the replica whose cache it is, behind a cluster gateway (None: one kernel)
