"""What the /proc-like syscalls return: plain dataclasses, JSON-ready with dataclasses.asdict.

Kept apart from the syscall table so that clients (the daemon's Client, the TUI)
can rebuild them without importing the kernel's machinery.
"""
from dataclasses import dataclass, field


@dataclass
class ReadResult:
    pid: int
    tokens: list                 # token ids generated since the last read
    text: str                    # their text (held back while a character is incomplete)
    state: str
    turn_done: bool              # the current turn ended (the process sleeps or exited)
    finish_reason: str | None
    logprobs: list = field(default_factory=list)   # new entries: [(token, logprob)] per position


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


@dataclass
class TenantSched:
    tid: int
    name: str
    weight: float
    served_tokens: int
    running: int
    waiting: int
    sleeping: int
    model: str = ""                  # what the tenant runs, for clients that need its facts
    eos_token_ids: list = field(default_factory=list)
    vocab_size: int = 0
    max_context: int = 0
    page_size: int = 0               # tokens per frame for this model


@dataclass
class SchedStat:
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
    recent_steps: list           # the last StepRecords (seconds, batch size, prefill, decode, padding)
