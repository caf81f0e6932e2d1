"""Beam search as process management: fork the best continuations, kill the rest.

Every beam is an interactive process whose turns generate nothing
(max_tokens=0) but report the top-k next tokens with their log-probabilities.
Each round the `width` best (beam, token) pairs survive: a beam chosen more than
once is forked (its pages are shared copy-on-write), the chosen token is
written into each survivor, and beams not chosen are killed.
"""
import contextlib
from dataclasses import dataclass

from kernel.errors import KvosError


@dataclass
class Beam:
    tokens: list
    score: float              # sum of log-probabilities
    finished: bool = False    # ended with an EOS id (else cut at max_tokens)
    pid: int | None = None    # the process that held it last

    def normalized(self, length_penalty: float) -> float:
        return self.score / max(1, len(self.tokens)) ** length_penalty


def _turn_logprobs(sys, pid, poll):
    """The most likely next tokens of a beam (its turn draws nothing: a TokenLogprob without a token)."""
    while True:
        r = sys.read(pid, timeout=poll)
        if r.turn_done:
            return r.logprobs[-1]


def _end(sys, pid) -> None:
    sys.kill(pid)
    sys.wait(pid)


def beam_search(sys, tid, prompt, width: int = 4, max_tokens: int = 32, eos_token_ids=(),
                length_penalty: float = 1.0, poll: float = 0.05, on_round=None) -> list:
    """The `width` best continuations of prompt, best first. -> [Beam]

    on_round(pids), if given, is called after each round with the live beams' pids (to look at their
    shared pages with pagemap, say); whatever it raises ends the search, as any error does, with
    every live beam killed and reaped.
    """
    root = sys.spawn(tid, prompt, max_tokens=0, logprobs=width, interactive=True)
    live = {root: Beam([], 0.0, pid=root)}
    done: list = []
    try:
        for _ in range(max_tokens):
            candidates = []
            for pid, beam in live.items():
                for top in _turn_logprobs(sys, pid, poll).top:
                    candidates.append((beam.score + top.logprob, pid, top.token))
            candidates.sort(key=lambda c: -c[0])
            chosen: dict = {}
            for score, pid, token in candidates[:width]:
                chosen.setdefault(pid, []).append((score, token))
            survivors = {}
            for pid, beam in list(live.items()):
                picks = chosen.get(pid)
                if not picks:
                    del live[pid]
                    _end(sys, pid)
                    continue
                forks = sys.fork(pid, len(picks) - 1) if len(picks) > 1 else []
                live.update((child, beam) for child in forks)      # killed below or kept: never lost
                for target, (score, token) in zip([pid] + forks, picks):
                    grown = Beam(beam.tokens + [token], score, pid=target)
                    if token in eos_token_ids:
                        grown.finished = True
                        done.append(grown)
                        del live[target]
                        _end(sys, target)
                    else:
                        sys.write(target, [token])
                        survivors[target] = grown
            live = survivors
            if on_round is not None:
                on_round(list(live))
            if not live or len(done) >= width:
                break
    finally:
        for pid in list(live):
            with contextlib.suppress(KvosError):      # gone already (its tenant killed, say)
                _end(sys, pid)
    ranked = sorted(done + list(live.values()), key=lambda b: -b.normalized(length_penalty))
    return ranked[:width]
