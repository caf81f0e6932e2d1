"""The verbs of one step after the plan: forward, sample, commit, record.

Kernel.step() calls them in this order under the kernel lock; data flows one way.
forward() runs each program on its share of the plan (simulate() prices it on
the simulated device instead), sample_rows() draws each process's next token,
commit() appends tokens and their bytes, checks stops and ends turns, record()
keeps schedstat and the step's trace record. Whether a work draws a token was
decided once, by the scheduler (Work.draws); a work with drafts (speculation,
kernel/speculate.py) is drawn from row by row at commit (commit_draft), since
whether a row counts depends on the draw before it.
"""
from array import array
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from kernel.bad_words import banned_next
from kernel.batch import host_batch, to_device
from kernel.devices.base import DeviceLost
from kernel.errors import KernelPanic, KvosError
from kernel.logprobs import drawn_logprobs, prompt_rows, score_prompts
from kernel.penalties import history_of
from kernel.proc import Process, State
from kernel.results import StepRecord, WorkRecord
from kernel.sampling import sample
from kernel.speculate import note_outcome
from kernel.watch import wake

_NO_SAMPLE = (None, None)
WORK_FIELDS = 6              # a work in a step record's array: pid, tid, start, count, token (-1: none), generated


@dataclass
class StepEvents:
    """What happened to processes since the last step record, outside the plan (exits by kill,
    wait or error): the next record carries it."""
    exits: list = field(default_factory=list)        # (pid, reason)


def forward(kernel, plan) -> dict:
    """Forward every program's share of the plan; returns pid -> (token or None, logprobs)."""
    groups: dict = {}
    for work in plan.works:                      # an adapter's processes run in its base's batch
        program = work.proc.tenant.program
        # LAB(lora): BEGIN -> groups.setdefault(id(program), []).append(work)
        groups.setdefault(id(getattr(program, "base_program", None) or program), []).append(work)
        # LAB(lora): END
    samples = {}
    for works in groups.values():
        program = works[0].proc.tenant.program
        if any(w.proc.tenant.program is not program for w in works):     # a base and its adapters
            program = program.base_program or program
        wanted = [w for w in works if w.logits and not w.draft]
        drafted = [w for w in works if w.draft]
        scoring, score_rows = prompt_rows(works)
        try:
            host, padding = host_batch(works, wanted, kernel.mm, kernel.null_frame if kernel.padded else None,
                                       kernel.page_rows, draft_rows(works) + score_rows if drafted else score_rows)
            kv, graphs = kernel.kv_view(program), kernel.graphs
            # LAB(lora): BEGIN -> others = []
            others = [(int(host.query_start[i]), int(host.query_start[i + 1]), w.proc.tenant.program)
                      for i, w in enumerate(works) if w.proc.tenant.program is not program]
            # LAB(lora): END
            if others:                             # adapters' rows beside the base's: this step's own program
                logits = kernel.device.forward(program.mixed(others), to_device(host, kernel.device), kv)
            elif graphs is not None and graphs.takes(program, host, kv):    # pure decode: static buffers, graphs
                logits, graph_padding = graphs.forward(program, host, kv)
                padding += graph_padding
            else:
                logits = kernel.device.forward(program, to_device(host, kernel.device), kv)
            plan.padding_tokens += padding
            if wanted:
                samples.update(sample_rows(wanted, logits[:len(wanted)] if scoring or drafted else logits))
            at = len(wanted)
            for w in drafted:                      # drawn from in commit, row by row (commit_draft)
                samples[w.proc.pid] = Drafted(logits[at:at + w.count])
                at += w.count
            if scoring:
                score_prompts(scoring, logits[at:])
                for w in works:
                    if w.proc.prompt_logprobs is not None:
                        w.proc.prompt_scored = max(w.proc.prompt_scored, min(w.end, len(w.proc.prompt_logprobs)))
        except DeviceLost as exc:                 # the device is gone: its processes end, the kernel goes on
            kernel.stats.forward_errors += 1
            for work in works:
                kernel.exit_process(work.proc, "error", error=f"EIO: {exc}")
            kernel.log("fault", f"{program.name}: {exc}; {len(works)} process(es) ended with EIO", level="error")
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
    acceptance = kernel.device.gpu.draft_acceptance
    return {w.proc.pid: Drafted(None, simulated_draws(w, acceptance)) if w.draft else
            (getattr(w.proc.tenant.program, "filler_token", 0), None) for w in plan.works if w.draws}


def simulated_draws(work, acceptance: float) -> tuple:
    """What a speculating work's rows draw on the simulated device: each draft in turn is drawn with
    probability `acceptance` (from the process's own uniforms: a seeded run repeats), the first one
    that is not gets another token, and rows after it are never looked at (commit_draft)."""
    program = work.proc.tenant.program
    filler = getattr(program, "filler_token", 0)
    draws = []
    for draft in work.draft:
        u = work.proc.uniforms.next()
        if u >= acceptance:
            draws.append(next(t for t in range(filler, -1, -1) if t != draft and t not in program.eos_token_ids))
            return tuple(draws)
        draws.append(draft)
    return tuple(draws) + (filler,)          # every draft drawn: the last row's token comes too


class Drafted(NamedTuple):
    """A speculating work's sample: the logits of all its rows (its last token's, then each draft's),
    or on the simulated device the tokens its rows draw (simulated_draws)."""
    logits: torch.Tensor | None
    draws: tuple = ()


def draft_rows(works) -> list:
    """The rows of the packed batch whose logits speculating works draw from, in works order: every
    row of such a work (the distribution after its last token, then after each draft)."""
    rows, offset = [], 0
    for w in works:
        if w.draft:
            rows += range(offset, offset + w.count)
        offset += w.count
    return rows


def sample_rows(works, logits) -> dict:
    """pid -> (token drawn or None, logprob entry or None) for works whose logits came back (in
    order). Processes with penalties, a grammar or logprobs (Process.shaped) take the longer path; a
    batch without any costs one flag per work. A work that draws nothing (a turn of max_tokens 0,
    as beam search's) still reports its next position's top logprobs if asked."""
    out, rows, drawing, shaped, peeking = {}, [], [], False, []
    for i, w in enumerate(works):
        if w.draws:
            rows.append(i)
            drawing.append(w.proc)
            shaped = shaped or w.proc.shaped
        else:
            out[w.proc.pid] = _NO_SAMPLE
            if w.proc.shaped:
                peeking.append(i)
    if peeking:
        procs = [works[i].proc for i in peeking]
        for j, entry in drawn_logprobs(logits[peeking], procs, [None] * len(procs)).items():
            out[procs[j].pid] = (None, entry)
    if not rows:
        return out
    x = logits if len(rows) == len(works) else logits[rows]
    params, generators = [p.params for p in drawing], [p.uniforms for p in drawing]
    if not shaped:
        for p, t in zip(drawing, sample(x, params, generators).tolist()):
            out[p.pid] = (t, None)
        return out
    histories = [history_of(p) if p.params.penalized else None for p in drawing]
    allowed = [None if p.constraint is None else p.constraint.allowed() for p in drawing]
    banned = [_banned(p) for p in drawing]
    tokens = sample(x, params, generators, histories, allowed, banned).tolist()
    entries = drawn_logprobs(x, drawing, tokens)
    for j, (p, t) in enumerate(zip(drawing, tokens)):
        out[p.pid] = (t, entries.get(j))
    return out


def _banned(proc) -> tuple:
    """What the process's next draw may not be: its turn's ends under min_tokens, its bad words' ends."""
    words = proc.params.bad_words_ids
    if not words:
        return _stops_before_min(proc)
    return _stops_before_min(proc) + banned_next(words, proc.tokens, proc.turn_generated)


def _stops_before_min(proc) -> tuple:
    """The tokens that would end the process's turn, while it has drawn fewer than min_tokens of it
    (the next draw may not be one of them); () once it has, or without min_tokens."""
    params = proc.params
    if proc.turn_generated >= params.min_tokens:
        return ()
    eos = () if params.ignore_eos else tuple(proc.tenant.program.eos_token_ids)
    return tuple(dict.fromkeys(params.stop_token_ids + eos))


def commit(kernel, plan, samples: dict) -> None:
    now = kernel.clock()
    publish, drawn = kernel.mm.publish, 0
    for work in plan.works:
        proc = work.proc
        if proc.state is State.ZOMBIE:             # its forward failed, or it ended in this plan
            continue
        if work.draft:
            token, taken = commit_draft(kernel, work, samples[proc.pid], now)
            samples[proc.pid] = (token, None)      # what record() traces: the step's last token
            drawn += taken
            continue
        proc.num_computed = work.start + work.count
        publish(proc.asid)
        if not work.last:
            continue
        if proc.builds_segment is not None:
            kernel.finish_segment(proc)
            continue
        token, logprobs = samples.get(proc.pid, _NO_SAMPLE)
        if not work.draws:                         # a turn with nothing (more) to generate
            if logprobs is not None:               # what it would draw from (beam search reads it)
                proc.logprobs.append(logprobs)
            kernel.end_turn(proc, "length")
            continue
        drawn += 1
        end_or_go_on(kernel, proc, take_token(proc, token, logprobs, now))
    kernel.stats.generated_tokens += drawn


def take_token(proc: Process, token: int, logprobs, now: float) -> str | None:
    """A drawn token joins the process: its file and bytes (append_token), its logprobs, penalty
    history and grammar. -> why its turn ends ("stop", "length"), "error" (the grammar refused it),
    or None."""
    reason = append_token(proc, token, now)
    if proc.shaped:
        if logprobs is not None:
            proc.logprobs.append(logprobs)
        if proc.history is not None:
            proc.history.add(token)
        if proc.constraint is not None:
            ended = proc.constraint.advance(token)
            if ended == "error":
                return "error"
            if ended == "stop":                    # the value is complete: nothing more may follow
                reason = "stop"
    return reason


def end_or_go_on(kernel, proc: Process, reason: str | None) -> None:
    """After a process took its token(s) of the step: end its turn (or the process, on a grammar's
    error) if the last one said so, and wake whoever reads its output."""
    if reason == "error":
        kernel.exit_process(proc, "error", error=f"EINVAL: json_schema: {proc.constraint.error}")
        return
    if reason is not None:
        kernel.end_turn(proc, reason)
    if proc.watchers:
        wake(proc, "output")


def commit_draft(kernel, work, drafted: Drafted, now: float) -> tuple:
    """Commit a speculating work (kernel/speculate.py): draw from its rows in order, as decoding one
    token a step would (sample_rows on one row: the same generator draws, penalties, grammar and
    logprobs), taking each token, and go on to the next row only while the token equals the draft
    that row's logits follow. The K/V of drafts not taken is forgotten before publish can name
    their pages. -> (the last token taken, tokens taken)."""
    proc, draft = work.proc, work.draft
    taken, token, reason = 0, None, None
    # LAB(speculate): BEGIN
    logits = drafted.logits
    for j in range(work.count):
        if logits is None:                         # the simulated device's draws
            token, logprobs = drafted.draws[j], None
        else:
            token, logprobs = sample_rows([work], logits[j:j + 1])[proc.pid]
        taken += 1
        reason = take_token(proc, token, logprobs, now)
        if reason is not None or j == len(draft) or token != draft[j]:
            break
    proc.num_computed = work.start + taken       # the drafts taken before the last token have their K/V
    kernel.mm.truncate(proc.asid, proc.num_computed)
    # LAB(speculate): END
    kernel.mm.publish(proc.asid)
    stats = kernel.stats
    stats.draft_tokens += len(draft)
    stats.accepted_tokens += taken - 1
    if proc.predicted_draft:
        proc.prediction_accepted += taken - 1
        proc.prediction_rejected += len(draft) - (taken - 1)
    note_outcome(proc, taken - 1, len(draft), stats.steps)
    end_or_go_on(kernel, proc, reason)
    return token, taken


def append_token(proc: Process, token: int, now: float) -> str | None:
    """The token joins the process's file and its bytes its output. -> why its turn ends, or None."""
    tokens = proc.tokens
    tokens.append(token)
    proc.output.append(len(tokens) - 1)
    proc.turn_generated += 1
    if proc.first_token_at is None:
        proc.first_token_at = now
    proc.last_token_at = now
    params, program = proc.params, proc.tenant.program
    piece = program.token_bytes(token)
    out = proc.out_bytes
    out += piece
    if token in program.eos_token_ids and not params.ignore_eos:
        return "stop"
    if params.stop_token_ids and token in params.stop_token_ids:
        return "stop"
    if proc.stops is not None and piece:
        proc.stop_state, found = proc.stops.feed(proc.stop_state, piece, len(out) - len(piece))
        if found is not None and proc.turn_generated >= params.min_tokens:   # min_tokens: a match before is text
            cut = found[1] if params.include_stop_str_in_output else found[0]
            del out[max(cut, proc.turn_byte_start):]          # (the stop string and) what follows it
            return "stop"
    if proc.turn_generated >= params.max_tokens or len(tokens) >= program.max_context:
        return "length"
    return None


def record(kernel, plan, samples: dict, seconds: float) -> None:
    """schedstat's counters, and the step's trace record. The ring keeps each record as one tuple of
    numbers, tuples and an array (nothing Python's garbage collector has to walk: per-step objects
    kept 512 steps made a step cost up to 1.7x more at 256 processes); readers get StepRecords
    (step_record)."""
    s = kernel.stats
    s.steps += 1
    s.busy_seconds += seconds
    s.prefill_tokens += plan.prefill_tokens
    s.decode_tokens += plan.decode_tokens
    s.padding_tokens += plan.padding_tokens
    sched, events = kernel.sched, kernel._events
    works = array("q")
    if s.steps <= s.traced_until:             # only while someone traces: a work costs ~0.5 us here
        for w in plan.works:
            proc = w.proc
            token = samples.get(proc.pid, _NO_SAMPLE)[0] if w.draws else None
            works.extend((proc.pid, proc.tenant.tid, w.start, w.count, -1 if token is None else token,
                          len(proc.output)))
    cost = getattr(kernel.device, "last_cost", None)
    s.history.append((
        s.steps, seconds, len(plan.works), plan.prefill_tokens, plan.decode_tokens, plan.padding_tokens,
        kernel.clock() - kernel.dmesg.boot_time, len(sched.running), len(sched.waiting), kernel.mm.frames.num_free,
        works, tuple(p.pid for p in plan.admitted), tuple(p.pid for p in plan.swapped_in),
        tuple((p.pid, how) for p, how in plan.preempted), tuple(p.pid for p in plan.cow_faults),
        tuple(events.exits), tuple((tid, n) for tid, n in sched.queued.items() if n),
        tuple(vars(cost).items()) + (("total", cost.total),)      # numbers only: asdict's deep copies cost
        if cost is not None and not kernel.device.has_tensors else None))
    events.exits.clear()


def record_step(raw) -> int:
    """The step number of a raw ring entry."""
    return raw[0]


def step_record(raw, detail: bool = True) -> StepRecord:
    """A ring entry as the StepRecord syscalls return (without its per-process lists: detail=False)."""
    (step, seconds, batch, prefill, decode, padding, ended_at, running, waiting, free, works, admitted,
     swapped_in, preempted, cow, exits, waiting_by, cost) = raw
    record = StepRecord(step, seconds, batch, prefill, decode, padding, ended_at, running, waiting, free)
    if detail:
        record.works = [WorkRecord(works[i], works[i + 1], works[i + 2], works[i + 3],
                                   None if works[i + 4] < 0 else works[i + 4], works[i + 5])
                        for i in range(0, len(works), WORK_FIELDS)]
        record.admitted, record.swapped_in, record.cow_faults = list(admitted), list(swapped_in), list(cow)
        record.preempted = [list(p) for p in preempted]
        record.exits = [list(e) for e in exits]
        record.waiting_by_tenant = dict(waiting_by)
        record.cost = None if cost is None else dict(cost)
    return record
