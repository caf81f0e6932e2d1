"""Every syscall, fed generated arguments (valid and not) between kernel steps.

Every call returns or raises KvosError; a refused call changes nothing the
caller could see; fsck() holds after every step; and greedy processes that run
to the end produce exactly what they produce in a clean run (which does not
speculate; the fuzzed kernel does). KVOS_FUZZ_SCALE
multiplies the number of examples (docs/reliability.md).
"""
import math
import os

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import kernel
from kernel.errors import ERRNOS, KvosError
from kernel.syscalls import SYSCALLS
from tests.kernel_helpers import TINY, frames

SCALE = float(os.environ.get("KVOS_FUZZ_SCALE", "1"))
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 40)), list(range(3, 20)) * 2, [100, 200, 300]]
# Greedy jobs whose output survivors must reproduce: (prompt, logit_bias). The forced one repeats a
# token, so the fuzzed kernel's drafts (speculate=3) are proposed and taken from its second token on.
JOBS = [(tuple(p), None) for p in PROMPTS] + [((7, 7, 7, 7), ((7, 100.0),))]
MAX_TOKENS = 6
STATS = {"calls": 0, "refused": 0, "by_errno": {}, "per_syscall": {}}

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.binary(max_size=16), st.lists(st.integers(-5, 700), max_size=20),
    st.dictionaries(st.text(max_size=6), st.integers(-3, 3), max_size=3), st.just("\ud800bad surrogate"),
    st.just([{"role": "user", "content": "hi"}]), st.just([{"role": 3}]), st.just(math.nan),
    st.lists(st.text(max_size=4), max_size=3),
)
sampling_keys = st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                                 "ignore_eos", "logprobs", "prompt_logprobs", "logit_bias", "min_tokens", "priority",
                                 "shm", "interactive", "bogus_key", "n", "timeout", "name", "mem_limit", "weight",
                                 "prefix_sharing", "max_procs"])


def clean_outputs():
    """Greedy outputs of each job run alone: what survivors must reproduce."""
    k = kernel.boot(memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    return {job: sys.wait(sys.spawn(tid, list(job[0]), **greedy(job))).tokens for job in JOBS}


def greedy(job) -> dict:
    """The spawn keys of a job (its bias, if it has one)."""
    keys = dict(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return keys if job[1] is None else dict(keys, logit_bias=job[1])


CLEAN = None


class SyscallFuzzer(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        global CLEAN
        if CLEAN is None:
            CLEAN = clean_outputs()
        # Speculation on (clean_outputs runs without it): its drafts, truncates and back-offs go
        # through every sequence too, and survivors must still match the clean run.
        self.k = kernel.boot(memory=frames(12), swap=frames(6), token_budget=24, speculate=3)
        self.root = self.k.syscalls()
        self.tids = [self.root.spawn_tenant(TINY, name="a", mem_limit=frames(8)),
                     self.root.spawn_tenant(TINY, name="b")]
        self.handles = [self.root] + [self.k.syscalls(as_tenant=t) for t in self.tids]
        self.valid = {}          # pid -> the job of greedy processes whose output must match CLEAN

    def _call(self, handle, name, args, kwargs):
        STATS["calls"] += 1
        STATS["per_syscall"][name] = STATS["per_syscall"].get(name, 0) + 1
        try:
            return getattr(handle, name)(*args, **kwargs)
        except KvosError as err:
            assert err.errno in ERRNOS
            STATS["refused"] += 1
            STATS["by_errno"][err.errno] = STATS["by_errno"].get(err.errno, 0) + 1
            return None

    def _pids(self):
        return list(self.k.procs) + [0, -1, 10**9]

    @rule(data=st.data(), name=st.sampled_from(sorted(SYSCALLS)), nargs=st.integers(0, 3),
          keys=st.lists(sampling_keys, max_size=3, unique=True))
    def call_anything(self, data, name, nargs, keys):
        handle = data.draw(st.sampled_from(self.handles))
        ids = st.sampled_from(self._pids() + self.tids + list(self.k.shm_segments) + [0])
        args = [data.draw(st.one_of(ids, junk)) for _ in range(nargs)]
        kwargs = {k: data.draw(st.one_of(junk, st.integers(0, 8))) for k in keys}
        if name in ("wait", "read"):
            kwargs["timeout"] = data.draw(st.one_of(st.just(0.0), st.floats(-1, 0.01), junk))
        if name == "spawn_tenant" and len(self.k.tenants) > 4:
            return
        self._call(handle, name, args, kwargs)

    @rule(data=st.data(), job=st.sampled_from(JOBS))
    def spawn_valid(self, data, job):
        tid = data.draw(st.sampled_from(self.tids))
        if tid not in self.k.tenants:
            return
        scoring = data.draw(st.sampled_from([None, 1]))      # its prompt scored by its own rows, or not
        pid = self._call(self.root, "spawn", [tid, list(job[0])], dict(greedy(job), prompt_logprobs=scoring))
        if pid is not None:
            self.valid[pid] = job

    @rule(data=st.data())
    def fork_or_kill(self, data):
        if not self.k.procs:
            return
        pid = data.draw(st.sampled_from(sorted(self.k.procs)))
        if data.draw(st.booleans()):
            self._call(self.root, "fork", [pid], {"n": data.draw(st.integers(1, 3))})
        else:
            self._call(self.root, "kill", [pid], {})

    @rule(n=st.integers(1, 4))
    def step(self, n):
        for _ in range(n):
            self.k.step()
            self.k.fsck()

    @invariant()
    def consistent(self):
        self.k.fsck()

    def teardown(self):
        self.k.run()
        self.k.fsck()
        for pid, job in self.valid.items():
            proc = self.k.procs.get(pid)
            if proc is not None and proc.exit is not None and proc.exit.reason == "length":
                assert proc.exit.tokens == CLEAN[job], f"pid {pid} produced other tokens than a clean run"
        for tid in list(self.k.tenants):
            self.root.kill_tenant(tid)
        self.k.fsck()
        info = self.root.meminfo()
        assert info.free + info.cached == info.total and info.swap_used == 0


SyscallFuzzer.TestCase.settings = settings(max_examples=int(40 * SCALE), stateful_step_count=30, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestSyscallFuzzer = SyscallFuzzer.TestCase
