"""The router: which replica a request goes to. Pure Python: no Ray, no kernel objects.

    router = Router(replicas=8, policy="cache_aware")
    r = router.route(tid, token_ids)         # -> replica index (router.last says why)
    router.on_dispatch(r)                    # the request is on its way there (load +1)
    router.on_finish(r)                      # it ended (load -1)
    router.update_load(r, running, waiting)  # what the replica reports (schedstat, a step record)
    router.apply_events(r, events)           # its cacheevents() since the last call (prefix_events)
    router.mark_dead(r)                      # never route there again; forget its cache

A replica's load is max(requests dispatched and not finished, running + waiting as last
reported): the first is exact for what this router sent, the second covers the rest.

Policies (each a small class with choose(router, tid, token_ids) -> Decision):

- round_robin: the next live replica, in turn.
- least_load: the live replica with the smallest load (ties in turn).
- cache_aware: SGLang's router. The longest prefix each replica holds, believed from what
  was routed there (ApproxIndex: blocks of `block` tokens, an LRU of `capacity` blocks per
  replica). If load is imbalanced (max - min > a margin and max > balance_rel x min) the
  least loaded replica; the margin is balance_abs requests with balance="absolute" (SGLang's
  rule), or, with balance="batch" (the default), balance_frac of the largest running batch a
  replica has reported (SGLang's 64 suits replicas running hundreds at once; kvos's run tens,
  where 64 is never reached and affinity alone piles sessions up); else, if the best match
  covers more than `cache_threshold` of the prompt, the best-matching replica (ties: least
  load); else the replica whose index is smallest (the most room for a new prefix). The
  chosen replica's index learns the prompt.
- prefix_events: llm-d's precise prefix-cache routing. The same rule, but what each replica
  holds is its own page cache, replayed from its cacheevents() (ResidentIndex), matched by
  page name: namer(tid, token_ids) gives the names of the prompt's full pages as the kernels
  compute them and the page size, (names, page_size) (kernel_namer below), so nothing is
  guessed; a low match goes to the least loaded replica.

Defaults follow SGLang's gateway (cache threshold 0.3, balance thresholds 64 and 1.5), except
that the absolute margin scales with the running batch (balance="batch", balance_frac 0.25);
docs/cluster.md says what each does to the simulated cluster.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

from kernel.errors import EINVAL, EIO, KvosError
from userspace.cluster.prefixindex import ApproxIndex, ResidentIndex, block_keys


@dataclass
class Decision:
    replica: int
    matched_tokens: int = 0      # of the prompt, held by that replica (as the policy believes)
    reason: str = ""             # "turn", "load", "imbalance", "prefix", "room"


class RoundRobin:
    name = "round_robin"

    def __init__(self):
        self.next = 0

    def choose(self, router, tid, token_ids) -> Decision:
        n = router.replicas
        for i in range(n):
            r = (self.next + i) % n
            if router.alive[r]:
                self.next = r + 1
                return Decision(r, 0, "turn")
        raise router.no_replica()


class LeastLoad:
    name = "least_load"

    def __init__(self):
        self.next = 0

    def choose(self, router, tid, token_ids) -> Decision:
        r = router.least_loaded(start=self.next)
        self.next = r + 1
        return Decision(r, 0, "load")


class _PrefixPolicy:
    """The rule SGLang's cache-aware router uses, over an index per replica."""

    def __init__(self, cache_threshold=0.3, balance_abs=64, balance_rel=1.5, balance="batch", balance_frac=0.25,
                 balance_batch=None):
        _check_number("cache_threshold", cache_threshold, 0.0, 1.0)
        _check_number("balance_abs", balance_abs, 0, 1 << 30)
        _check_number("balance_rel", balance_rel, 1.0, 1e9)
        _check_number("balance_frac", balance_frac, 0.0, 1e6)
        if balance_batch is not None:
            _check_int("balance_batch", balance_batch, 1, 1 << 30)
        if balance not in BALANCE:
            raise KvosError(EINVAL, f"balance must be one of {', '.join(BALANCE)}, got {balance!r}")
        self.cache_threshold, self.balance_abs, self.balance_rel = cache_threshold, balance_abs, balance_rel
        self.balance, self.balance_frac, self.balance_batch = balance, balance_frac, balance_batch

    def abs_threshold(self, router) -> float:
        """The load difference beyond which affinity gives way. "absolute": balance_abs requests
        (SGLang). "batch": balance_frac of the largest running batch a live replica has reported,
        so the margin scales with what a replica runs at once; balance_abs until one reports. A
        peak seen at low load is the load, not what a replica can run: balance_batch, the batch
        a replica can hold (known to whoever sized it), is a floor under it."""
        if self.balance == "absolute":
            return self.balance_abs
        batch = max(max((router.peak_running[r] for r in router.live()), default=0), self.balance_batch or 0)
        return self.balance_frac * batch if batch else self.balance_abs

    def imbalanced(self, router) -> bool:
        loads = [router.load(r) for r in router.live()]
        lo, hi = min(loads), max(loads)
        return hi - lo > self.abs_threshold(router) and hi > self.balance_rel * lo

    def decide(self, router, keys, total: int, block: int, low_match) -> Decision:
        live = router.live()
        if self.imbalanced(router):
            r = router.least_loaded()
            return Decision(r, self.index(r).match(keys) * block, "imbalance")
        matches = {r: self.index(r).match(keys) for r in live}
        best = max(matches.values())
        if best and best * block > self.cache_threshold * total:
            r = min((r for r in live if matches[r] == best), key=router.load)
            return Decision(r, best * block, "prefix")
        r = low_match(live)
        return Decision(r, matches[r] * block, "room")


class CacheAware(_PrefixPolicy):
    name = "cache_aware"

    def __init__(self, replicas: int, block=16, capacity=1 << 20, **thresholds):
        super().__init__(**thresholds)
        _check_int("block", block, 1, 1 << 20)
        _check_int("capacity", capacity, 1, 1 << 40)
        self.block = block
        self.trees = [ApproxIndex(capacity) for _ in range(replicas)]

    def index(self, r):
        return self.trees[r]

    def choose(self, router, tid, token_ids) -> Decision:
        keys = block_keys(tid, token_ids, self.block)
        d = self.decide(router, keys, len(token_ids), self.block,
                        lambda live: min(live, key=lambda r: (len(self.trees[r]), router.load(r))))
        self.trees[d.replica].insert(keys)
        return d

    def forget(self, r) -> None:
        self.trees[r].clear()


class PrefixEvents(_PrefixPolicy):
    name = "prefix_events"

    def __init__(self, replicas: int, namer=None, **thresholds):
        super().__init__(**thresholds)
        if not callable(namer):
            raise KvosError(EINVAL, "prefix_events needs namer(tid, token_ids) -> (the prompt's page names, "
                                    "page size) (kernel_namer)")
        self.namer = namer
        self.resident = [ResidentIndex() for _ in range(replicas)]

    def index(self, r):
        return self.resident[r]

    def choose(self, router, tid, token_ids) -> Decision:
        names, block = self.namer(tid, token_ids)
        return self.decide(router, names, len(token_ids), block, lambda live: router.least_loaded())

    def forget(self, r) -> None:
        self.resident[r].clear()


POLICIES = {p.name: p for p in (RoundRobin, LeastLoad, CacheAware, PrefixEvents)}
BALANCE = ("batch", "absolute")


class Router:
    """Routes requests over `replicas` replicas (numbered 0..replicas-1) with one policy.
    Options go to the policy: block, capacity (cache_aware), namer (prefix_events),
    cache_threshold, balance_abs, balance_rel, balance, balance_frac, balance_batch (both prefix policies)."""

    def __init__(self, replicas: int, policy: str = "cache_aware", **options):
        _check_int("replicas", replicas, 1, 1 << 16)
        if policy not in POLICIES:
            raise KvosError(EINVAL, f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.replicas = replicas
        kind = POLICIES[policy]
        if kind in (RoundRobin, LeastLoad):
            if options:
                raise KvosError(EINVAL, f"{policy} takes no options, got {', '.join(sorted(options))}")
            self.policy = kind()
        else:
            try:
                self.policy = kind(replicas, **options)
            except TypeError as exc:
                raise KvosError(EINVAL, f"{policy}: {exc}") from None
        self.inflight = [0] * replicas
        self.reported = [0] * replicas
        self.peak_running = [0] * replicas     # the largest running batch each replica has reported
        self.alive = [True] * replicas
        self.routed = [0] * replicas
        self.last: Decision | None = None

    # -- routing ----------------------------------------------------------------------------
    def route(self, tid, token_ids) -> int:
        """The replica for a request of tenant `tid` whose prompt is `token_ids`."""
        if not isinstance(token_ids, (list, tuple)):
            raise KvosError(EINVAL, "token_ids must be a list of ints")
        try:
            array("q", token_ids)                  # every id an int in range, checked in C
        except (TypeError, OverflowError):
            raise KvosError(EINVAL, "token_ids must be a list of ints") from None
        if not any(self.alive):
            raise self.no_replica()
        self.last = self.policy.choose(self, tid, token_ids)
        self.routed[self.last.replica] += 1
        return self.last.replica

    # -- what replicas report -------------------------------------------------------------------
    def on_dispatch(self, replica: int) -> None:
        self.inflight[self._replica(replica)] += 1

    def on_finish(self, replica: int) -> None:
        r = self._replica(replica)
        if self.inflight[r] == 0:
            raise KvosError(EINVAL, f"replica {r} has no request in flight to finish")
        self.inflight[r] -= 1

    def update_load(self, replica: int, running: int, waiting: int) -> None:
        r = self._replica(replica)
        _check_int("running", running, 0, 1 << 30)
        _check_int("waiting", waiting, 0, 1 << 30)
        self.reported[r] = running + waiting
        self.peak_running[r] = max(self.peak_running[r], running)

    def apply_events(self, replica: int, events) -> None:
        """A replica's page-cache events (CacheEvents, in order); only prefix_events uses them."""
        r = self._replica(replica)
        if isinstance(self.policy, PrefixEvents):
            self.policy.resident[r].apply(events)

    def mark_dead(self, replica: int) -> None:
        """The replica is gone: never route there again, forget what it held and its load."""
        r = self._replica(replica)
        self.alive[r] = False
        self.inflight[r] = self.reported[r] = self.peak_running[r] = 0
        forget = getattr(self.policy, "forget", None)
        if forget is not None:
            forget(r)

    # -- for the policies ---------------------------------------------------------------------
    def load(self, r: int) -> int:
        return max(self.inflight[r], self.reported[r])

    def live(self) -> list:
        return [r for r in range(self.replicas) if self.alive[r]]

    def least_loaded(self, start: int = 0) -> int:
        """The live replica of smallest load; ties go to the first from `start` on, in turn."""
        n = self.replicas
        order = [(start + i) % n for i in range(n) if self.alive[(start + i) % n]]
        if not order:
            raise self.no_replica()
        return min(order, key=self.load)

    def no_replica(self) -> KvosError:
        return KvosError(EIO, "no replica is alive")

    def _replica(self, replica) -> int:
        _check_int("replica", replica, 0, self.replicas - 1)
        return replica


def kernel_namer(namespaces: dict, page_sizes: dict):
    """namer(tid, token_ids) -> (the hex names a kernel gives the prompt's full pages, page size), for
    prefix_events: namespaces {tid: tenantinfo(tid).page_namespace}, page_sizes {tid:
    tenantinfo(tid).page_size} (the same on every replica for a tenant given a cache_salt)."""
    from kernel.pagename import chain_names
    roots = {tid: bytes.fromhex(ns) for tid, ns in namespaces.items()}

    def namer(tid, token_ids):
        if tid not in roots:
            raise KvosError(EINVAL, f"no page namespace known for tenant {tid}")
        size = page_sizes[tid]
        return [n.hex() for n in chain_names(roots[tid], token_ids, size)], size
    return namer


def _check_int(name, value, lo, hi) -> None:
    if type(value) is not int or not lo <= value <= hi:
        raise KvosError(EINVAL, f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _check_number(name, value, lo, hi) -> None:
    if type(value) not in (int, float) or not lo <= value <= hi:
        raise KvosError(EINVAL, f"{name} must be a number in [{lo}, {hi}], got {value!r}")
