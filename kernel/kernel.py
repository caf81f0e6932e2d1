"""The Kernel: process table, tenants, memory, and the step (docs/design.md has the whole picture).

    plan   = sched.schedule()       who runs, how many tokens, who is preempted or ends (memory bookkept)
    apply the plan's exits          processes that can never fit end with ENOMEM
    mm.flush()                      copy-on-write and swap bytes move, batched, in order
    batch  = host_batch(works)      per program: packed tokens, positions, slots, page tables (kept across
                                    steps in kernel/pagerows.py), checked
    logits = program.forward(...)   on the device (pure decode: through the decode graphs, if on)
    tokens = sample(logits, ...)    per-process parameters and seeded uniforms
    commit(plan, tokens)            append token bytes, stop checks, turn ends, exits free pages (a process
                                    with drafts draws here, row by row, and keeps the drafts drawn)
    record(plan)                    schedstat counters and the step's trace record

All state changes happen under `lock`. After each step the callers waiting on a
process that changed are woken (watch), and `changed` is notified for the loop
thread and tracers. Without a loop thread, calls that wait (wait, read with a
timeout, trace) drive the loop themselves. Userspace holds only what boot()
returns and the handles of syscalls(); everything else here is the kernel's.
The process table's verbs (create, fork, exit, reap, turns) are in kernel/processes.py.
"""
from __future__ import annotations

import os
import secrets
import threading

import torch

from kernel import loop as kloop
from kernel import step
from kernel.devices import make_device
from kernel.dmesg import Dmesg
from kernel.errors import EINVAL, ENOMEM, KvosError
from kernel.klock import KernelLock
from kernel.mm import MemoryManager, namespace_name
from kernel.pagename import salt_of
from kernel.pagerows import PageRows
from kernel.proc import Process, Residency, State
from kernel.processes import ProcessTable
from kernel.program import exec_program
from kernel.sampling import SamplingParams
from kernel.sched.policies import make_policy
from kernel.sched.scheduler import Scheduler
from kernel.sched.stats import SchedStats
from kernel.shm import ShmSegment
from kernel.speculate import MAX_DECODES, MAX_DRAFT
from kernel.tenant import Tenant
from kernel.units import parse_bytes
from kernel.watch import BlockingCount


class Kernel(ProcessTable):
    def __init__(self, device="cpu", memory=None, page_size=16, policy="fcfs", token_budget=512,
                 swap="1GiB", chunk=None, max_running=256, frame_bytes=None, alloc="paged",
                 batch="ragged", watermark=None, threads=None, seed=0, pids="sequential", loop=False,
                 frames=None, swap_frames=None, tp=1, graphs=False, speculate=0,
                 speculate_batch=MAX_DECODES):
        _check_int("page_size", page_size, 1, 4096)
        _check_int("token_budget", token_budget, 1, 1 << 20)
        _check_int("max_running", max_running, 1, 1 << 20)
        chunk = token_budget if chunk is None else chunk
        _check_int("chunk", chunk, 1, 1 << 20)
        if alloc not in ("paged", "prealloc"):
            raise KvosError(EINVAL, f"alloc must be 'paged' or 'prealloc', got {alloc!r}")
        if batch not in ("ragged", "padded"):
            raise KvosError(EINVAL, f"batch must be 'ragged' or 'padded', got {batch!r}")
        if frame_bytes is not None:
            _check_int("frame_bytes", frame_bytes, 1, 1 << 34)
        for name, value in (("frames", frames), ("swap_frames", swap_frames)):
            if value is not None:
                _check_int(name, value, 0 if name == "swap_frames" else 1, 1 << 30)
        if frames is not None and memory is not None:
            raise KvosError(EINVAL, "give memory (bytes) or frames (of the first tenant's pages), not both")
        if graphs not in (False, True, "eager"):
            raise KvosError(EINVAL, f"graphs must be False, True or 'eager', got {graphs!r}")
        if graphs and (tp != 1 or (isinstance(device, str) and device.startswith("sim"))):
            raise KvosError(EINVAL, "graphs: decode graphs run on one cpu or cuda device (the simulator prices "
                                    "them with its graphs constant: sim:h200,graphs=1)")
        _check_int("speculate", speculate, 0, MAX_DRAFT)
        _check_int("speculate_batch", speculate_batch, 1, 1 << 20)
        if speculate and (alloc == "prealloc" or batch == "padded"):
            raise KvosError(EINVAL, "speculate: drafts run with paged memory and ragged batches")
        if pids not in ("sequential", "random"):
            raise KvosError(EINVAL, f"pids must be 'sequential' or 'random', got {pids!r}")
        self.memory_bytes = None if memory is None else parse_bytes(memory, "memory")   # None: the device's default
        self.swap_bytes = parse_bytes(swap, "swap")
        self.pool_frames, self.swap_frames = frames, swap_frames   # sizes in frames, once a frame has a size
        self.page_size = page_size
        self.frame_bytes = frame_bytes
        self.padded = batch == "padded"
        # Decode graphs (kernel/devices/graphs.py): True captures them on CUDA and runs the padded static
        # batches eagerly elsewhere; "eager" never captures. Both need the null frame.
        self.graph_mode, self.graph_max_batch = graphs, min(max_running, 512)
        self.graphs = None
        self.watermark = watermark
        self.lock = KernelLock()                                   # guards everything below; FIFO (kernel/klock.py)
        self.changed = threading.Condition(self.lock)              # notified after every step
        self.loop_thread = None                                    # kernel/loop.py: the loop thread, if one runs
        self.loop_error = None                                     # what stopped that loop, if anything
        self.loop_state = kloop.LoopState()                         # paused, single steps asked, idle since
        if threads is None and os.environ.get("KVOS_THREADS"):    # one pool for torch and the C kernels
            try:
                threads = int(os.environ["KVOS_THREADS"])
            except ValueError:
                raise KvosError(EINVAL, f"KVOS_THREADS={os.environ['KVOS_THREADS']!r} is not a number "
                                        f"of threads") from None
        if threads is not None:
            _check_int("threads (or KVOS_THREADS)", threads, 1, 1024)
            if not (isinstance(device, str) and device.startswith("sim")):   # the simulator runs no op
                from kernel.ops import set_num_threads
                set_num_threads(threads)
        # boot, one subsystem a line
        self.device = make_device(device, tp, threads)             # where frames live and programs run
        self.clock = self.device.clock                             # wall time, or the simulator's virtual time
        self.dmesg = Dmesg(clock=self.clock)                       # the kernel log
        self.stats = SchedStats()                                  # schedstat counters
        self.mm = None                                             # sized by the first tenant (or frame_bytes)
        self.policy = make_policy(policy)                          # who runs first, who is preempted
        self.sched = Scheduler(self, self.policy, token_budget, chunk, max_running, alloc == "prealloc",
                               speculate, speculate_batch)   # ... and how many tokens it may guess ahead
        self.procs: dict = {}                                      # pid -> Process (until reaped)
        self.tenants: dict = {}                                    # tid -> Tenant
        self.shm_segments: dict = {}                               # shmid -> ShmSegment
        self.kv_views: dict = {}                                   # id(program) -> KVView of the pool
        self.rng = torch.Generator().manual_seed(seed)             # seeds for processes spawned without one
        self._ids = {"pid": 0, "tid": 0, "shmid": 0, "arrival": 0}
        self.random_ids = pids == "random"                         # pids and shmids that say nothing of others
        self._events = step.StepEvents()                           # exits since the last step record
        self.blocking = BlockingCount()                              # Tenant.blocked (kernel/watch.py)
        self.null_frame = None                                     # padded batches write padding here
        self.page_rows = None                                      # kernel/pagerows.py, with the mm
        self.accepting = True                                      # False once shutdown() began
        if frame_bytes is not None:
            self._size_pool(frame_bytes)
        memory_text = f"{self.memory_bytes} bytes" if self.memory_bytes else "the device's default amount"
        self.log("boot", f"kvos booted on {self.device.name}: {memory_text} of KV memory, "
                 f"policy {self.policy.name}, token budget {token_budget}, chunk {chunk}")
        if loop:
            self.start_loop()                                      # steps run in their own thread

    # -- small helpers -------------------------------------------------------------------
    def _next(self, kind: str) -> int:
        if self.random_ids and kind in ("pid", "shmid"):
            # Sequential ids tell a tenant how much others spawn; these tell nothing (pids="random").
            taken = self.procs if kind == "pid" else self.shm_segments
            while True:
                value = 1 + secrets.randbelow((1 << 31) - 2)
                if value not in taken:
                    return value
        self._ids[kind] += 1
        return self._ids[kind]

    def log(self, event, message, *, proc=None, tenant=None, level="info"):
        tid = proc.tenant.tid if proc is not None else (tenant.tid if tenant is not None else None)
        self.dmesg.log(event, message, tid=tid, pid=proc.pid if proc is not None else None, level=level)

    def sleeping_resident(self) -> list:
        return [p for p in self.procs.values() if p.state == State.SLEEPING and p.residency == Residency.RESIDENT]

    # -- memory ----------------------------------------------------------------------------
    def _size_pool(self, frame_bytes: int, program=None) -> None:
        if self.pool_frames is not None:
            self.memory_bytes = self.pool_frames * frame_bytes
        if self.swap_frames is not None:
            self.swap_bytes = self.swap_frames * frame_bytes
        if self.memory_bytes is None:
            self.memory_bytes = self.device.default_memory(program)
        num_frames = self.memory_bytes // frame_bytes
        if num_frames < 1:
            raise KvosError(ENOMEM, f"memory of {self.memory_bytes} bytes holds no frame of {frame_bytes} bytes")
        self.frame_bytes = frame_bytes
        self.mm = MemoryManager(self.device, num_frames, frame_bytes,
                                swap_slots=self.swap_bytes // frame_bytes, watermark=self.watermark)
        self.page_rows = PageRows(self.mm)  # the batch builder's page table, kept across steps
        if self.padded or self.graph_mode:   # one frame outside every cgroup absorbs the K/V of padding tokens
            asid = self.mm.create(0, 1, b"null")
            self.mm.append(asid, [0])
            self.null_frame = self.mm.space(asid).frames[0]
        if self.graph_mode:
            from kernel.devices.graphs import DecodeGraphs
            capture = self.graph_mode is True and self.device.kind == "cuda"
            self.graphs = DecodeGraphs(self.device, self.null_frame, self.graph_max_batch, capture)
        self.log("mm", f"frame pool: {num_frames} frames of {frame_bytes} bytes, "
                 f"{self.swap_bytes // frame_bytes} swap slots")

    def kv_view(self, program):
        view = self.kv_views.get(id(program))
        if view is None:
            view = self.kv_views[id(program)] = (program, self.device.kv_view(program.kv_shape))
        return view[1]

    # -- tenants ---------------------------------------------------------------------------
    def create_tenant(self, model, name=None, mem_limit=None, weight=1, prefix_sharing="tenant",
                      max_procs=None, max_queued=None, max_blocked=None, nice_min=None, max_prompt_tokens=None,
                      max_new_tokens=None, cache_salt=None) -> Tenant:
        """A tenant running `model` (a loaded Program, or a spec loaded here: syscalls load in the
        caller's context and pass the program). Limits left None take Tenant's defaults. cache_salt
        (root's, validated by spawn_tenant) salts page names so that they agree on every kernel
        given the same salt; on one kernel a salted namespace belongs to one tenant only."""
        program = exec_program(model, self.device)
        if prefix_sharing == "global":
            salt = b"global"
        else:
            salt = os.urandom(16) if cache_salt is None else salt_of(cache_salt)
        namespace = namespace_name(program.identity, salt)
        if cache_salt is not None and any(t.namespace == namespace for t in self.tenants.values()):
            raise KvosError(EINVAL, "cache_salt: another tenant of this program has the same salt "
                                    "(names never agree across tenants)")
        if self.mm is None:
            self._size_pool(self.page_size * program.kv_shape.bytes_per_token, program)
        page_size = program.kv_shape.tokens_per_frame(self.frame_bytes)
        if page_size < 1:
            raise KvosError(ENOMEM, f"{program.name} needs {program.kv_shape.bytes_per_token} bytes per token; "
                                    f"frames hold {self.frame_bytes}")
        limit = None
        if mem_limit is not None:
            limit = parse_bytes(mem_limit, "mem_limit") // self.frame_bytes
            if limit < 1:
                raise KvosError(EINVAL, f"mem_limit {mem_limit!r} is smaller than one frame ({self.frame_bytes} bytes)")
        tid = self._next("tid")
        name = name or f"{program.name}-{tid}"
        given = {k: v for k, v in dict(max_procs=max_procs, max_queued=max_queued, max_blocked=max_blocked,
                                       nice_min=nice_min).items() if v is not None}
        tenant = Tenant(tid=tid, name=name, program=program, cgid=self.mm.create_cgroup(name, limit),
                        weight=float(weight), prefix_sharing=prefix_sharing,
                        namespace=namespace, page_size=page_size,
                        mem_limit=limit, **given,
                        max_prompt_tokens=min(max_prompt_tokens or program.max_context - 1, program.max_context - 1),
                        max_new_tokens=min(max_new_tokens or program.max_context, program.max_context))
        self.tenants[tid] = tenant
        self.log("tenant", f"tenant {tid} {name!r} runs {program.name} ({page_size} tokens per page, "
                 f"limit {limit if limit else 'none'} frames, weight {weight})", tenant=tenant)
        return tenant

    def remove_tenant(self, tenant: Tenant) -> None:
        for proc in [p for p in self.procs.values() if p.tenant is tenant]:
            if proc.alive:
                self.exit_process(proc, "killed")
            self.reap(proc)                           # nobody is left to wait for them
        for seg in [s for s in self.shm_segments.values() if s.tenant is tenant]:
            self.remove_segment(seg)
        self.mm.remove_cgroup(tenant.cgid)
        tenant.alive = False
        del self.tenants[tenant.tid]
        if not any(t.program is tenant.program for t in self.tenants.values()):
            self.kv_views.pop(id(tenant.program), None)     # nothing holds the program here: it may go
        self.log("tenant", f"tenant {tenant.tid} {tenant.name!r} killed", tenant=tenant)

    # -- memory shares ----------------------------------------------------------------------------
    def guaranteed_frames(self, tenant: Tenant) -> int:
        """Frames `tenant` may always hold: its limit, or its weight's fraction of the pool among all
        tenants. Pinned shm frames must stay within it (running work is evened out by preemption)."""
        share = self.mm.num_frames * tenant.weight // sum(t.weight for t in self.tenants.values())
        return int(share if tenant.mem_limit is None else min(share, tenant.mem_limit))

    def pinned_frames(self, tenant: Tenant) -> int:
        """Frames pinned (or being prefilled) for `tenant`'s shm segments."""
        return sum(-(-len(s.tokens) // tenant.page_size) for s in self.shm_segments.values() if s.tenant is tenant)

    def mappers(self) -> dict:
        """{frame: [pid]}: the processes whose page tables map each frame (the memory map's labels)."""
        out: dict = {}
        for proc in self.procs.values():
            if proc.asid is not None and proc.residency == Residency.RESIDENT:
                for frame in self.mm.space(proc.asid).frames:
                    out.setdefault(frame, []).append(proc.pid)
        return out

    # -- shm -------------------------------------------------------------------------------------
    def create_segment(self, tenant, tokens) -> ShmSegment:
        seg = ShmSegment(shmid=self._next("shmid"), tenant=tenant, tokens=list(tokens))
        builder = self.create_process(tenant, tokens, SamplingParams(max_tokens=0))
        builder.builds_segment = seg
        seg.builder = builder.pid
        self.shm_segments[seg.shmid] = seg
        self.log("shm", f"shm {seg.shmid}: prefilling {len(tokens)} tokens (builder pid {builder.pid})",
                 tenant=tenant)
        return seg

    def finish_segment(self, proc: Process) -> None:
        seg = proc.builds_segment
        seg.mm_shmid = self.mm.make_segment(proc.asid)
        proc.asid, proc.residency = None, Residency.NONE
        self.sched.remove(proc)
        proc.state = State.ZOMBIE
        proc.tenant.num_live -= 1
        self.reap(proc)
        seg.builder = None
        self.log("shm", f"shm {seg.shmid} ready: {len(seg.tokens)} tokens pinned", tenant=seg.tenant)

    def remove_segment(self, seg: ShmSegment) -> None:
        if seg.builder is not None and seg.builder in self.procs:
            builder = self.procs[seg.builder]
            builder.builds_segment = None
            self.exit_process(builder, "killed")
            self.reap(builder)
        if seg.mm_shmid is not None:
            self.mm.remove_segment(seg.mm_shmid)
        self.shm_segments.pop(seg.shmid, None)
        self.log("shm", f"shm {seg.shmid} removed", tenant=seg.tenant)

    # -- the loop ----------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one time slice. Returns False when there was nothing to do."""
        with self.lock:
            if self.mm is None or self.sched.idle:
                return False
            started = self.clock()
            self.dmesg.step = self.stats.steps + 1
            plan = self.sched.schedule()
            for proc, error in plan.ended:
                self.exit_process(proc, "error", error=error)
            self.mm.flush()
            if plan.empty:
                self.changed.notify_all()
                return bool(plan.preempted or plan.ended)
            samples = step.forward(self, plan) if self.device.has_tensors else step.simulate(self, plan)
            step.commit(self, plan, samples)
            step.record(self, plan, samples, self.clock() - started)
            self.changed.notify_all()
            return True

    def run(self, max_steps: int | None = None) -> int:
        """Step until nothing is runnable (or max_steps). Returns steps taken."""
        steps = 0
        while (max_steps is None or steps < max_steps) and self.step():
            steps += 1
        return steps

    # -- the loop in its own thread (the daemon): kernel/loop.py --------------------------------------
    def start_loop(self, idle_wait: float = 0.05) -> threading.Thread:
        return kloop.start_loop(self, idle_wait)

    def stop_loop(self) -> None:
        kloop.stop_loop(self)

    def shutdown(self, kill: bool = False, timeout: float | None = None) -> None:
        kloop.shutdown(self, kill, timeout)

    # -- checks and handles -----------------------------------------------------------------------------
    def fsck(self) -> None:
        """Memory invariants plus the process table's."""
        from kernel.fsck import fsck
        with self.lock:
            fsck(self)

    def syscalls(self, as_tenant=None):
        from kernel.syscalls import SyscallHandle
        return SyscallHandle(self, as_tenant)


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise KvosError(EINVAL, f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
