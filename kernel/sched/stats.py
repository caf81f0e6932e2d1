"""schedstat: what the scheduler did, as counters and per-step history."""
from collections import deque
from dataclasses import dataclass, field

TRACE_STEPS = 512                    # step records kept; a tracer reading less often than this loses some


@dataclass
class SchedStats:
    steps: int = 0
    busy_seconds: float = 0.0
    prefill_tokens: int = 0          # prompt (and recomputed) tokens computed
    decode_tokens: int = 0           # tokens computed to produce the next token
    cached_tokens: int = 0           # prompt tokens mapped from the page cache or shm instead of computed
    generated_tokens: int = 0        # tokens sampled
    draft_tokens: int = 0            # tokens computed on speculation (kernel/speculate.py)
    accepted_tokens: int = 0         # of those, the ones the draws then matched (their K/V kept)
    padding_tokens: int = 0          # token slots wasted by batch="padded"
    admissions: int = 0
    preemptions: int = 0
    swap_outs: int = 0               # processes swapped out
    swap_ins: int = 0
    reclaims: int = 0                # processes whose pages were dropped, to be recomputed
    recomputed_tokens: int = 0       # tokens computed again after a reclaim (the page cache did not keep them)
    exits: int = 0
    oom_kills: int = 0
    forward_errors: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=TRACE_STEPS))   # the trace ring (kernel/step.py)
    traced_until: int = 0            # records carry their per-process works up to this step (trace() extends it)

    @property
    def tokens_per_second(self) -> float:
        computed = self.prefill_tokens + self.decode_tokens
        return computed / self.busy_seconds if self.busy_seconds else 0.0

    @property
    def generated_per_second(self) -> float:
        return self.generated_tokens / self.busy_seconds if self.busy_seconds else 0.0
