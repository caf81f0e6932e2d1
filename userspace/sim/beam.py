"""Beam search on the simulated device: libc/beam.py's fork/kill pattern over synthetic scores.

Each round every beam proposes `width` continuations scored by the largest parts of a
Dirichlet(alpha) draw; the `width` best cumulative scores survive. A beam chosen k times is
forked k - 1 times (pages shared copy-on-write), one not chosen is killed.
"""
from __future__ import annotations

import numpy as np


class SimBeamSearch:
    def __init__(self, width: int, rng: np.random.Generator, alpha: float = 1.0):
        self.width = width
        self.rng = rng
        self.alpha = alpha
        self.beams: dict = {}            # pid -> cumulative log-probability, best first
        self.rounds = 0

    def start(self, root: int) -> None:
        self.beams = {root: 0.0}

    def round(self, sys) -> tuple:
        """One selection: returns (killed pids, {parent: [new child pids]})."""
        width = self.width
        # Dirichlet draws as normalized gammas, one row per beam, all in one call
        draws = self.rng.gamma(self.alpha, size=(len(self.beams), width + 1))
        probs = -np.sort(-draws / draws.sum(axis=1, keepdims=True), axis=1)[:, :width]
        scores = np.log(np.maximum(probs, 1e-30)) + np.fromiter(self.beams.values(), float)[:, None]
        pids = list(self.beams)
        flat = scores.ravel()
        best = np.argsort(-flat, kind="stable")[:width]
        candidates = [(float(flat[i]), pids[i // width]) for i in best]
        picks: dict = {}
        for score, pid in candidates[:width]:
            picks.setdefault(pid, []).append(score)
        killed, forked, survivors = [], {}, []
        for pid in self.beams:
            chosen = picks.get(pid)
            if not chosen:
                sys.kill(pid)
                killed.append(pid)
                continue
            children = sys.fork(pid, len(chosen) - 1) if len(chosen) > 1 else []
            if children:
                forked[pid] = children
            survivors += zip([pid] + children, chosen)
        self.beams = dict(sorted(survivors, key=lambda s: -s[1]))
        self.rounds += 1
        return killed, forked
