"""Stored wrong solutions: the mistakes students make, each a change to the reference inside one lab's
regions. CI grades each one (tests/test_labs.py) and it must lose points: a grader that passes a
wrong kernel is a bug in the grader. `old` is found once in the lab's regions, ignoring indentation
and trailing comments (userspace/lab/regions.py: mutate).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from userspace.lab import catalog, regions


@dataclass(frozen=True)
class Wrong:
    lab: str
    name: str
    mistake: str
    path: str
    old: str
    new: str

    def files(self, root: Path = catalog.ROOT) -> dict:
        """The lab's files as a student submitting this mistake would hand them in."""
        out = {rel: (root / rel).read_text() for rel in catalog.get(self.lab).files}
        out[self.path] = regions.mutate(out[self.path], self.lab, self.old, self.new, self.path)
        return out


MEM, SCHED, POL = "kernel/mm/memory.py", "kernel/sched/scheduler.py", "kernel/sched/policies.py"
SWAP, PREEMPT, STEP = "kernel/mm/swap.py", "kernel/sched/preempt.py", "kernel/step.py"
WRONG = (
    # pagetable
    Wrong("pagetable", "floor-pages", "pages counted with floor division: a partly filled page gets no frame", MEM,
          "return max(0, -(-(space.num_tokens + num_tokens) // space.page_size) - len(space.frames))",
          "return max(0, (space.num_tokens + num_tokens) // space.page_size - len(space.frames))"),
    Wrong("pagetable", "virtual-slots", "slots from the virtual position: the page table is never consulted", MEM,
          "return [frames[i // ps] * ps + i % ps for i in range(start, start + n)]",
          "return list(range(start, start + n))"),
    Wrong("pagetable", "free-leaks", "an exit that forgets its frames", MEM,
          "for frame in space.frames:\nself.frames.decref(frame)", ""),
    # cow
    Wrong("cow", "copy-without-copy", "the fault maps a fresh frame but never copies the page into it", MEM,
          'self.pending.append(MemOp("copy", shared, private))', ""),
    Wrong("cow", "fault-without-decref", "the fault keeps its reference to the shared frame", MEM,
          "self.frames.decref(shared)", ""),
    Wrong("cow", "no-fault", "no fault at all: a write into a shared page lands in everyone's page", MEM,
          "return offset != 0 and self.frames.is_shared(space.frames[vpn])", "return False"),
    Wrong("cow", "fork-without-incref", "fork shares the frames without counting the new mappings", MEM,
          "for frame in child.frames:\nself.frames.incref(frame, child.cgroup)", ""),
    # pagecache
    Wrong("pagecache", "trust-the-hash", "a hit trusts the name alone, never comparing the stored page",
          "kernel/mm/pagecache.py",
          "page = self.page_of[frame]\nif page.parent != parent or page.tokens != tuple(tokens):\nreturn None", ""),
    Wrong("pagecache", "mru-eviction", "the most recently used cached page is evicted first", "kernel/mm/frames.py",
          "frame, _ = self.lru.popitem(last=False)", "frame, _ = self.lru.popitem(last=True)"),
    Wrong("pagecache", "whole-prompt-hit", "a hit may cover the whole prompt, leaving nothing to compute logits from",
          MEM, "limit = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))",
          "limit = len(tokens)"),
    Wrong("pagecache", "attach-without-incref", "shm pages mapped without a reference of their own", MEM,
          "for frame in seg.frames:\nself.frames.incref(frame, space.cgroup)\nspace.frames = list(seg.frames)",
          "space.frames = list(seg.frames)"),
    # swap
    Wrong("swap", "reclaim-keeps-count", "a reclaim that keeps its computed count: readmission skips the dropped "
          "tokens", PREEMPT, "proc.num_computed = 0", ""),
    Wrong("swap", "swap-in-without-copy", "swap-in maps fresh frames but never copies the pages back", SWAP,
          'self.pending.append(MemOp("swap_in", slot, frame))', ""),
    Wrong("swap", "swap-out-keeps-frames", "swap-out copies the pages out but keeps the frames", SWAP,
          "space.swap_slots.append(slot)\nself.frames.decref(frame)", "space.swap_slots.append(slot)"),
    # batch
    Wrong("batch", "positions-from-zero", "positions restart at 0 each step: RoPE sees every chunk at the start",
          "kernel/batch.py", "positions += range(w.start, w.end)", "positions += range(w.count)"),
    Wrong("batch", "sample-first-row", "logits sampled from a work's first row, not its last", "kernel/batch.py",
          "sample_indices.append(query_start[-1] - 1)", "sample_indices.append(query_start[-2])"),
    Wrong("batch", "context-is-count", "context length of this step's tokens only: attention forgets the past",
          "kernel/batch.py", "context_lens.append(w.end)", "context_lens.append(w.count)"),
    Wrong("batch", "article-padding", "the padding formula (n - 1)(B - 1), right only when one sequence is long",
          "kernel/batch.py", "padding = longest * len(works) - query_start[-1]",
          "padding = (longest - 1) * (len(works) - 1)"),
    # sched
    Wrong("sched", "prefills-first", "prefill chunks scheduled before running decodes", SCHED,
          "groups = (decoders, prefillers)", "groups = (prefillers, decoders)"),
    Wrong("sched", "no-chunk-cap", "no per-process chunk: a long prompt takes the whole budget", SCHED,
          "return min(proc.remaining, self.chunk, budget)", "return min(proc.remaining, budget)"),
    Wrong("sched", "no-budget-cap", "a process's quantum ignores what is left of the step's budget", SCHED,
          "return min(proc.remaining, self.chunk, budget)", "return min(proc.remaining, self.chunk)"),
    # fair
    Wrong("fair", "no-lift", "a tenant becoming active keeps its old counter and takes everything until it catches "
          "up", POL, "others = [t.virtual_tokens for t in active_tenants if t is not tenant]\nif others:\n"
          "tenant.virtual_tokens = max(tenant.virtual_tokens, min(others))", "pass"),
    Wrong("fair", "no-weights", "every token counts 1 whatever the tenant's weight", POL,
          "proc.tenant.virtual_tokens += weight * tokens / proc.tenant.weight",
          "proc.tenant.virtual_tokens += weight * tokens"),
    Wrong("fair", "sorted-once", "the order sorted once at the start of the step: the counters' moves are ignored",
          POL, "import heapq", "yield from sorted(procs, key=self.key)\nreturn\nimport heapq"),
    # klock
    Wrong("klock", "lifo", "the lock goes to the newest waiter", "kernel/klock.py",
          "waiter = self._queue.popleft()", "waiter = self._queue.pop()"),
    Wrong("klock", "depth-lost", "a waiter gets the lock at depth 1, whatever depth it waited at", "kernel/klock.py",
          "self._owner, self._depth = waiter.thread, waiter.depth", "self._owner, self._depth = waiter.thread, 1"),
    Wrong("klock", "timeout-drops-hand-off", "a wait that times out as the lock is handed to it leaves the queue "
          "again", "kernel/klock.py", "got = self._owner == me", "got = False"),
    # speculate
    Wrong("speculate", "accept-every-draft", "every draft is kept, whatever was drawn from its row", STEP,
          "if reason is not None or j == len(draft) or token != draft[j]:",
          "if reason is not None or j == len(draft):"),
    Wrong("speculate", "no-roll-back", "the rejected drafts' tokens stay in the address space", STEP,
          "kernel.mm.truncate(proc.asid, proc.num_computed)", ""),
    Wrong("speculate", "computed-past-the-kept", "the last token taken counted as computed: its K/V never is",
          STEP, "proc.num_computed = work.start + taken",
          "proc.num_computed = work.start + min(taken + 1, work.count)"),
    Wrong("speculate", "truncate-keeps-frames", "truncate forgets the tokens but keeps the frames mapped", MEM,
          "del space.frames[space.num_pages:]\nfor frame in dropped:\nself.frames.decref(frame)", ""),
    Wrong("speculate", "occurrence-at-the-end", "the suffix itself counts as its earlier occurrence: nothing follows "
          "it", "kernel/speculate.py", "end = 4 * (total - 1)", "end = 4 * total"),
    # lora
    Wrong("lora", "delta-on-every-row", "each adapter's delta added to every row of the batch, the base's and "
          "the other adapters' too", "userspace/programs/lora.py",
          "y.index_add_(0, rows, weights.delta(x.index_select(0, rows)).to(y.dtype))",
          "y += weights.delta(x).to(y.dtype)"),
    Wrong("lora", "shared-identity", "the adapter's pages named as the base's: the page cache maps one into "
          "the other", "userspace/programs/lora.py",
          "program.identity = hashlib.sha256(base.identity + digest).digest()", "program.identity = base.identity"),
    Wrong("lora", "a-row-a-process", "a process's rows taken as one row (right at decode, wrong for a prompt "
          "chunk)", STEP,
          "others = [(int(host.query_start[i]), int(host.query_start[i + 1]), w.proc.tenant.program)\n"
          "for i, w in enumerate(works) if w.proc.tenant.program is not program]",
          "others = [(i, i + 1, w.proc.tenant.program)\n"
          "for i, w in enumerate(works) if w.proc.tenant.program is not program]"),
    Wrong("lora", "a-forward-per-program", "adapters grouped by program: every adapter reads the base's weights "
          "in a forward of its own", STEP,
          'groups.setdefault(id(getattr(program, "base_program", None) or program), []).append(work)',
          "groups.setdefault(id(program), []).append(work)"),
    # hugepages
    Wrong("hugepages", "no-madvise", "the arena is aligned but never advised: Linux's madvise mode backs it with "
          "4 KiB pages", "kernel/ops/hugepages.py", "self.mapping.madvise(mmap.MADV_HUGEPAGE, start, self.size)", ""),
    Wrong("hugepages", "advise-one-page", "only the arena's first 2 MiB advised: the rest of it is another "
          "mapping, in 4 KiB pages", "kernel/ops/hugepages.py",
          "self.mapping.madvise(mmap.MADV_HUGEPAGE, start, self.size)",
          "self.mapping.madvise(mmap.MADV_HUGEPAGE, start, HUGE_PAGE)"),
    Wrong("hugepages", "used-not-advanced", "every copy in the first slot: each take overwrites the one before",
          "kernel/ops/hugepages.py", "self.used += -(-nbytes // ALIGN) * ALIGN", ""),
    Wrong("hugepages", "slots-not-rounded", "slots packed back to back: a tensor after one of an odd size is "
          "off its cache line", "kernel/ops/hugepages.py", "self.used += -(-nbytes // ALIGN) * ALIGN",
          "self.used += nbytes"),
    Wrong("hugepages", "a-view-not-a-copy", "take hands back its argument: the weights never leave the file's "
          "4 KiB pages", "kernel/ops/hugepages.py", "return out", "return t"),
)
