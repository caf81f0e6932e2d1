"""A stand-in router (round robin), until the real one (userspace/cluster/router.py) lands.

TEMPORARY: deleted when the router module is merged; cluster.py then uses that one."""
from __future__ import annotations

import itertools


class RoundRobin:
    name = "round_robin"

    def __init__(self):
        self._turn = itertools.count()

    def choose(self, tid, prompt, live: list, loads: dict) -> int:
        return live[next(self._turn) % len(live)]
