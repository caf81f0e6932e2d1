"""`kvos lab predict`: OSTEP-style questions, generated from a seed, answered by running kvos.

Each concept makes a Question from a seed: the scenario and what to predict (text), the answer
worked out by hand from its numbers (answer, explain), and measure(), which runs the scenario on
the simulated device through syscalls and reads the same numbers back. `-c` shows both;
tests/test_lab_predict.py checks that they agree for several seeds of every concept.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from kernel.errors import ENOENT, KvosError


@dataclass
class Question:
    concept: str
    seed: int
    text: str
    answer: dict                   # name -> value, from the scenario's numbers alone
    explain: str
    measure: Callable[[], dict]    # name -> value, read off a kernel running the scenario

    def agrees(self, measured: dict) -> bool:
        return measured == self.answer


def _concepts() -> dict:
    from userspace.lab.predict import batching, fairness, memory, speculation
    return {"kvbudget": memory.kv_budget, "prealloc": memory.reservation, "cow": memory.copy_on_write,
            "padding": batching.padding, "chunk": batching.chunking, "convoy": batching.convoy,
            "fair": fairness.fair_share, "speculate": speculation.drafting}


CONCEPTS = ("kvbudget", "prealloc", "cow", "padding", "chunk", "convoy", "fair", "speculate")
ABOUT = {"kvbudget": "how many tokens of K/V a memory holds", "prealloc": "the waste of reserving for max_tokens",
         "cow": "what fork shares and what the first write copies", "padding": "the waste of rectangular batches",
         "chunk": "chunked prefill: steps to a first token, the longest step", "convoy": "static batching's convoy",
         "fair": "tokens served by weight under fair share",
         "speculate": "steps saved by drafts kept, drafts wasted under the back-off"}


def ask(concept: str, seed: int = 0) -> Question:
    makers = _concepts()
    if concept not in makers:
        raise KvosError(ENOENT, f"no question about {concept!r}: ask about {', '.join(CONCEPTS)}")
    return makers[concept](random.Random(f"{concept}:{seed}"), seed)
