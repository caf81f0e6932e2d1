"""The plan of one step: which process computes which tokens, and every decision the kernel applies.

The scheduler decides and books memory as it plans; the kernel applies the rest
in order: processes to end (ENOMEM), the queued memory operations, the forward
pass of the works, sampling and commit. Nothing flows back into the scheduler
during a step.
"""
from dataclasses import dataclass, field


@dataclass(slots=True)       # hundreds a step: slots make them cheaper to make and to read
class Work:
    proc: object             # kernel.proc.Process
    start: int               # index in proc.tokens of the first token computed
    count: int               # tokens computed this step
    slots: list              # pool slot of each of them
    last: bool               # the last token is the process's newest: its turn can go on after this step
    logits: bool             # its last row's logits are wanted (to draw a token, or to report logprobs)
    draws: bool              # a token is drawn from them (the turn has tokens left to generate)
    draft: tuple = ()        # speculated tokens computed after its last one (kernel/speculate.py): count includes them

    @property
    def end(self) -> int:
        return self.start + self.count

    @property
    def input_tokens(self) -> list:
        """The tokens its rows compute: its part of the file, then its drafts."""
        if not self.draft:
            return self.proc.tokens[self.start:self.end]
        return self.proc.tokens[self.start:self.end - len(self.draft)] + list(self.draft)


@dataclass
class Plan:
    works: list = field(default_factory=list)
    admitted: list = field(default_factory=list)
    swapped_in: list = field(default_factory=list)
    preempted: list = field(default_factory=list)    # (process, "swap" | "reclaim")
    ended: list = field(default_factory=list)        # (process, error): to exit with reason "error"
    cow_faults: list = field(default_factory=list)   # processes that copied a shared page
    prefill_tokens: int = 0
    decode_tokens: int = 0
    padding_tokens: int = 0          # batch="padded" only: slots wasted to keep batches rectangular

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @property
    def empty(self) -> bool:
        return not self.works
