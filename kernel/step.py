"""The verbs of one step after the plan (DESIGN section 3): forward, sample, commit, record.

Kernel.step() calls them in this order under the kernel lock; data flows one way.
forward() runs each program on its share of the plan (simulate() prices it on
the simulated device instead), sample_rows() draws each process's next token,
commit() appends tokens, checks stops and ends turns, record() keeps schedstat.
"""
import torch

from kernel.batch import build_batch
from kernel.errors import KernelPanic, KvosError
from kernel.proc import Process
from kernel.sampling import sample
from kernel.sched.stats import StepRecord


def forward(kernel, plan) -> dict:
    """Forward every program's share of the plan; returns pid -> (token or None, logprobs)."""
    groups: dict = {}
    for work in plan.works:
        groups.setdefault(id(work.proc.tenant.program), []).append(work)
    samples = {}
    for works in groups.values():
        program = works[0].proc.tenant.program
        wanted = [w for w in works if w.samples and w.proc.builds_segment is None]
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
    return {w.proc.pid: (getattr(w.proc.tenant.program, "filler_token", 0), None)
            for w in plan.works if w.samples and w.proc.builds_segment is None
            and w.proc.params.max_tokens > w.proc.turn_generated}


def sample_rows(works, logits) -> dict:
    procs = [w.proc for w in works]
    sampling = [p for p in procs if p.params.max_tokens > p.turn_generated]
    out = {p.pid: (None, None) for p in procs}
    if sampling:
        rows = [i for i, p in enumerate(procs) if p.params.max_tokens > p.turn_generated]
        tokens = sample(logits[rows], [p.params for p in sampling], [p.generator for p in sampling])
        for p, t in zip(sampling, tokens.tolist()):
            out[p.pid] = (t, None)
    wants_logprobs = [i for i, p in enumerate(procs) if getattr(p.params, "logprobs", 0)]
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
        if not proc.alive:
            continue
        proc.num_computed = work.end
        kernel.mm.publish(proc.asid)
        if not work.samples:
            continue
        if proc.builds_segment is not None:
            kernel.finish_segment(proc)
            continue
        token, logprobs = samples.get(proc.pid, (None, None))
        if logprobs is not None:
            proc.logprobs.append(logprobs)
        if token is None:                          # a turn with nothing (more) to generate
            kernel.end_turn(proc, "length")
            continue
        append_token(kernel, proc, token, now)


def append_token(kernel, proc: Process, token: int, now: float) -> None:
    proc.tokens.append(token)
    proc.output.append(len(proc.tokens) - 1)
    proc.turn_generated += 1
    kernel.stats.generated_tokens += 1
    if proc.first_token_at is None:
        proc.first_token_at = now
    proc.last_token_at = now
    params, program = proc.params, proc.tenant.program
    reason = None
    if token in program.eos_token_ids and not params.ignore_eos:
        reason = "stop"
    elif params.stop_token_ids and token in params.stop_token_ids:
        reason = "stop"
    elif params.stop:
        detok = kernel.detokenizer(proc)
        detok.add(proc.generated_tokens)
        if detok.stopped_at is not None:
            reason = "stop"
    if reason is None and (proc.turn_generated >= params.max_tokens or len(proc.tokens) >= program.max_context):
        reason = "length"
    if reason:
        kernel.end_turn(proc, reason)


def record(kernel, plan, seconds: float) -> None:
    s = kernel.stats
    s.steps += 1
    s.busy_seconds += seconds
    s.prefill_tokens += plan.prefill_tokens
    s.decode_tokens += plan.decode_tokens
    s.padding_tokens += plan.padding_tokens
    s.history.append(StepRecord(s.steps, seconds, len(plan.works), plan.prefill_tokens, plan.decode_tokens,
                                plan.padding_tokens))
