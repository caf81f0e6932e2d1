"""The verbs of one step after the plan: forward, sample, commit, record.

Kernel.step() calls them in this order under the kernel lock; data flows one way.
forward() runs each program on its share of the plan (simulate() prices it on
the simulated device instead), sample_rows() draws each process's next token,
commit() appends tokens and their bytes, checks stops and ends turns, record()
keeps schedstat and the step's trace record. Whether a work draws a token was
decided once, by the scheduler (Work.draws).
"""
from dataclasses import asdict, dataclass, field

import torch

from kernel.batch import build_batch
from kernel.errors import KernelPanic, KvosError
from kernel.proc import Process
from kernel.results import StepRecord
from kernel.sampling import sample


@dataclass
class StepEvents:
    """What happened to processes since the last step record, outside the plan (exits by kill,
    wait or error): the next record carries it."""
    exits: list = field(default_factory=list)        # (pid, reason)


def forward(kernel, plan) -> dict:
    """Forward every program's share of the plan; returns pid -> (token or None, logprobs)."""
    groups: dict = {}
    for work in plan.works:
        groups.setdefault(id(work.proc.tenant.program), []).append(work)
    samples = {}
    for works in groups.values():
        program = works[0].proc.tenant.program
        wanted = [w for w in works if w.logits]
        try:
            batch, padding = build_batch(works, wanted, kernel.mm, kernel.device, kernel.null_frame)
            plan.padding_tokens += padding
            logits = program.forward(batch, kernel.kv_view(program))
            if wanted:
                samples.update(sample_rows(wanted, logits))
        except KvosError:
            raise
        except KernelPanic:
            raise
        except Exception as exc:                   # a failing program takes its batch, not the kernel
            kernel.stats.forward_errors += 1
            for work in works:
                kernel.exit_process(work.proc, "error", error=f"forward failed: {type(exc).__name__}: {exc}")
            kernel.log("fault", f"{program.name}: forward failed ({type(exc).__name__}: {exc}); "
                     f"{len(works)} process(es) ended", level="error")
    return samples


def simulate(kernel, plan) -> dict:
    """The simulated device prices the step; every sampling process gets a filler token
    (workloads prescribe lengths with max_tokens and ignore_eos)."""
    groups: dict = {}
    for work in plan.works:
        groups.setdefault(id(work.proc.tenant.program), (work.proc.tenant.program, []))[1].append(work)
    if kernel.padded:      # what build_batch pads a real batch with: every sequence to the longest
        for _, works in groups.values():
            plan.padding_tokens += max(w.count for w in works) * len(works) - sum(w.count for w in works)
    kernel.device.simulate_step(list(groups.values()), plan)
    return {w.proc.pid: (getattr(w.proc.tenant.program, "filler_token", 0), None) for w in plan.works if w.draws}


def sample_rows(works, logits) -> dict:
    """pid -> (token drawn or None, top logprobs or None) for works whose logits came back (in order)."""
    procs = [w.proc for w in works]
    out = {p.pid: (None, None) for p in procs}
    rows = [i for i, w in enumerate(works) if w.draws]
    if rows:
        drawing = [procs[i] for i in rows]
        tokens = sample(logits[rows], [p.params for p in drawing], [p.generator for p in drawing])
        for p, t in zip(drawing, tokens.tolist()):
            out[p.pid] = (t, None)
    wants_logprobs = [i for i, p in enumerate(procs) if p.params.logprobs]
    if wants_logprobs:
        logp = torch.log_softmax(logits[wants_logprobs].float(), dim=-1)
        for row, i in enumerate(wants_logprobs):
            p = procs[i]
            values, ids = torch.topk(logp[row], p.params.logprobs)
            out[p.pid] = (out[p.pid][0], list(zip(ids.tolist(), values.tolist())))
    return out


def commit(kernel, plan, samples: dict) -> None:
    now = kernel.clock()
    for work in plan.works:
        proc = work.proc
        if not proc.alive:                         # its forward failed, or it ended in this plan
            continue
        proc.num_computed = work.end
        kernel.mm.publish(proc.asid)
        if not work.last:
            continue
        if proc.builds_segment is not None:
            kernel.finish_segment(proc)
            continue
        token, logprobs = samples.get(proc.pid, (None, None))
        if logprobs is not None:
            proc.logprobs.append(logprobs)
        if not work.draws:                         # a turn with nothing (more) to generate
            kernel.end_turn(proc, "length")
        else:
            append_token(kernel, proc, token, now)
            kernel.wake(proc, "output")


def append_token(kernel, proc: Process, token: int, now: float) -> None:
    """The token joins the process's file and its bytes its output; stop conditions end the turn."""
    proc.tokens.append(token)
    proc.output.append(len(proc.tokens) - 1)
    proc.turn_generated += 1
    kernel.stats.generated_tokens += 1
    if proc.first_token_at is None:
        proc.first_token_at = now
    proc.last_token_at = now
    params, program = proc.params, proc.tenant.program
    piece = program.token_bytes(token)
    out = proc.out_bytes
    start = len(out)
    out += piece
    reason = None
    if token in program.eos_token_ids and not params.ignore_eos:
        reason = "stop"
    elif params.stop_token_ids and token in params.stop_token_ids:
        reason = "stop"
    elif proc.stops is not None and piece:
        proc.stop_state, cut = proc.stops.feed(proc.stop_state, piece, start)
        if cut is not None:
            del out[max(cut, proc.turn_byte_start):]          # the stop string and what follows it
            reason = "stop"
    if reason is None and (proc.turn_generated >= params.max_tokens or len(proc.tokens) >= program.max_context):
        reason = "length"
    if reason:
        kernel.end_turn(proc, reason)


def record(kernel, plan, samples: dict, seconds: float) -> None:
    """schedstat's counters, and the step's trace record (per-process parts kept as tuples:
    trace() turns them into WorkRecords only when asked)."""
    s = kernel.stats
    s.steps += 1
    s.busy_seconds += seconds
    s.prefill_tokens += plan.prefill_tokens
    s.decode_tokens += plan.decode_tokens
    s.padding_tokens += plan.padding_tokens
    sched, events = kernel.sched, kernel._events
    works = [(w.proc.pid, w.proc.tenant.tid, w.start, w.count, samples.get(w.proc.pid, (None,))[0] if w.draws
              else None, len(w.proc.output)) for w in plan.works]
    cost = getattr(kernel.device, "last_cost", None)
    s.history.append(StepRecord(
        s.steps, seconds, len(plan.works), plan.prefill_tokens, plan.decode_tokens, plan.padding_tokens,
        ended_at=kernel.clock() - kernel.dmesg.boot_time, running=len(sched.running), waiting=len(sched.waiting),
        frames_free=kernel.mm.frames.num_free, works=works, admitted=[p.pid for p in plan.admitted],
        swapped_in=[p.pid for p in plan.swapped_in], preempted=[[p.pid, how] for p, how in plan.preempted],
        cow_faults=[p.pid for p in plan.cow_faults], exits=[list(e) for e in events.exits],
        waiting_by_tenant={tid: n for tid, n in sched.queued.items() if n},
        cost=dict(asdict(cost), total=cost.total) if cost is not None and not kernel.device.has_tensors else None))
    events.exits.clear()
