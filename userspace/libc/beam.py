"""Beam search as process management: fork the best continuations, kill the rest.

Every beam is an interactive process whose turns generate nothing
(max_tokens=0) but report the top-k next tokens with their log-probabilities.
Each round the `width` best (beam, token) pairs survive: a beam chosen more than
once is forked (its pages are shared copy-on-write), the chosen token is
written into each survivor, and beams not chosen are killed.
"""
from dataclasses import dataclass


@dataclass
class Beam:
    tokens: list
    score: float              # sum of log-probabilities
    finished: bool = False

    def normalized(self, length_penalty: float) -> float:
        return self.score / max(1, len(self.tokens)) ** length_penalty


def _turn_logprobs(sys, pid, poll):
    """The most likely next tokens of a beam (its turn draws nothing: a TokenLogprob without a token)."""
    while True:
        r = sys.read(pid, timeout=poll)
        if r.turn_done:
            return r.logprobs[-1]


def beam_search(sys, tid, prompt, width: int = 4, max_tokens: int = 32, eos_token_ids=(),
                length_penalty: float = 1.0, poll: float = 0.05, on_round=None) -> list:
    """The `width` best continuations of prompt, best first. -> [Beam]

    on_round(pids), if given, is called after each round with the live beams' pids
    (to look at their shared pages with pagemap, say).
    """
    root = sys.spawn(tid, prompt, max_tokens=0, logprobs=width, interactive=True)
    live = {root: Beam([], 0.0)}
    done: list = []
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
        for pid, beam in live.items():
            picks = chosen.get(pid)
            if not picks:
                sys.kill(pid)
                sys.wait(pid)
                continue
            targets = [pid] + (sys.fork(pid, len(picks) - 1) if len(picks) > 1 else [])
            for target, (score, token) in zip(targets, picks):
                grown = Beam(beam.tokens + [token], score)
                if token in eos_token_ids:
                    grown.finished = True
                    done.append(grown)
                    sys.kill(target)
                    sys.wait(target)
                else:
                    sys.write(target, [token])
                    survivors[target] = grown
        live = survivors
        if on_round is not None:
            on_round(list(live))
        if not live or len(done) >= width:
            break
    for pid in live:
        sys.kill(pid)
        sys.wait(pid)
    ranked = sorted(done + list(live.values()), key=lambda b: -b.normalized(length_penalty))
    return ranked[:width]
