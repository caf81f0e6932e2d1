"""A hypothesis state machine drives the memory manager through random operation sequences.

A tiny pool (6 frames of 2 tokens, 4 swap slots, one cgroup limited to 4
frames) makes eviction, exhaustion and swap-full common. After every step:
fsck(), and every resident address space reads back its own tokens from its
own frames, so a wrong copy-on-write, swap, page-cache mapping or truncate shows
up as wrong data. A refused operation must leave everything as it was.
"""
import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kernel.mm import MemoryPressure, SwapFull
from tests.mm_helpers import append, make_mm, read_tokens, snapshot

NS = b"tiny"
PAGE = 2
PROMPTS = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6, 7], [1, 2, 9], [7, 7, 7, 7]]


class MemoryMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.mm = make_mm(num_frames=6, page_size=PAGE, swap_slots=4)
        self.cgroups = [self.mm.create_cgroup("a"), self.mm.create_cgroup("b", limit=4)]
        self.expected = {}        # asid -> tokens it must hold
        self.segments = {}        # shmid -> tokens
        self.refused = 0

    def _refused(self, before):
        assert snapshot(self.mm) == before, "a refused operation changed memory-manager state"
        self.refused += 1

    @property
    def resident(self):
        return [a for a in self.expected if not self.mm.space(a).is_swapped]

    @rule(cg=st.integers(0, 1), prompt=st.sampled_from(PROMPTS), use_cache=st.booleans())
    def spawn(self, cg, prompt, use_cache):
        mm = self.mm
        asid = mm.create(self.cgroups[cg], PAGE, NS)
        hit = mm.map_cached(asid, prompt, max_tokens=len(prompt) - 1) if use_cache else 0
        self.expected[asid] = list(prompt[:hit])
        self.append_tokens(asid, prompt[hit:])

    def append_tokens(self, asid, tokens):
        before = snapshot(self.mm)
        try:
            append(self.mm, asid, tokens)
        except MemoryPressure:
            self._refused(before)
            return
        self.expected[asid].extend(tokens)

    @precondition(lambda self: self.resident)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 9), min_size=1, max_size=5))
    def grow(self, data, tokens):
        self.append_tokens(data.draw(st.sampled_from(self.resident)), tokens)

    def _unnamed(self):
        return [a for a in self.resident if self.mm.space(a).num_tokens > len(self.mm.space(a).names) * PAGE]

    @precondition(lambda self: self._unnamed())
    @rule(data=st.data())
    def truncate(self, data):
        """A speculation's rejected drafts: tokens past the last named page go back."""
        asid = data.draw(st.sampled_from(self._unnamed()))
        space = self.mm.space(asid)
        keep = data.draw(st.integers(len(space.names) * PAGE, space.num_tokens - 1))
        self.mm.truncate(asid, keep)
        del self.expected[asid][keep:]

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def publish(self, data):
        self.mm.publish(data.draw(st.sampled_from(sorted(self.expected))))

    @precondition(lambda self: self.resident)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.resident))
        child = self.mm.fork(parent)
        self.expected[child] = list(self.expected[parent])

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def exit(self, data):
        asid = data.draw(st.sampled_from(sorted(self.expected)))
        self.mm.free(asid)
        del self.expected[asid]

    @precondition(lambda self: self.resident)
    @rule(data=st.data())
    def swap_out(self, data):
        asid = data.draw(st.sampled_from(self.resident))
        before = snapshot(self.mm)
        try:
            self.mm.swap_out(asid)
        except SwapFull:
            self._refused(before)

    @precondition(lambda self: any(self.mm.space(a).is_swapped for a in self.expected))
    @rule(data=st.data())
    def swap_in(self, data):
        asid = data.draw(st.sampled_from([a for a in self.expected if self.mm.space(a).is_swapped]))
        before = snapshot(self.mm)
        try:
            self.mm.swap_in(asid)
        except MemoryPressure:
            self._refused(before)

    @precondition(lambda self: any(self.expected[a] for a in self.resident))
    @rule(data=st.data())
    def shmget(self, data):
        asid = data.draw(st.sampled_from([a for a in self.resident if self.expected[a]]))
        shmid = self.mm.make_segment(asid)
        self.segments[shmid] = self.expected.pop(asid)

    @precondition(lambda self: self.segments)
    @rule(data=st.data(), cg=st.integers(0, 1), more=st.lists(st.integers(0, 9), max_size=3))
    def attach(self, data, cg, more):
        shmid = data.draw(st.sampled_from(sorted(self.segments)))
        asid = self.mm.create(self.cgroups[cg], PAGE, NS)
        self.mm.attach(asid, shmid)
        self.expected[asid] = list(self.segments[shmid])
        if more:
            self.append_tokens(asid, more)

    @precondition(lambda self: self.segments)
    @rule(data=st.data())
    def shmrm(self, data):
        shmid = data.draw(st.sampled_from(sorted(self.segments)))
        self.mm.remove_segment(shmid)
        del self.segments[shmid]

    @invariant()
    def consistent(self):
        self.mm.fsck()
        for asid in self.resident:
            assert read_tokens(self.mm, asid) == self.expected[asid], f"address space {asid} reads wrong data"

    def teardown(self):
        for asid in list(self.expected):
            self.mm.free(asid)
        for shmid in list(self.segments):
            self.mm.remove_segment(shmid)
        self.mm.fsck()
        info = self.mm.meminfo()
        assert info.free + info.cached == info.total
        assert info.swap_used == 0


MemoryMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestMemoryMachine = MemoryMachine.TestCase
