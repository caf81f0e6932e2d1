"""The plan of one step: which process computes which tokens, and what memory moved for it."""
from dataclasses import dataclass, field


@dataclass
class Work:
    proc: object             # kernel.proc.Process
    start: int               # index in proc.tokens of the first token computed
    count: int               # tokens computed this step
    slots: list              # pool slot of each of them
    samples: bool            # the last one is the process's newest token: its logits are sampled

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass
class Plan:
    works: list = field(default_factory=list)
    admitted: list = field(default_factory=list)
    swapped_in: list = field(default_factory=list)
    preempted: list = field(default_factory=list)    # (process, "swap" | "reclaim")
    oom_killed: list = field(default_factory=list)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    padding_tokens: int = 0          # batch="padded" only: slots wasted to keep batches rectangular

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @property
    def empty(self) -> bool:
        return not self.works
