"""llama.cpp (llama-cpp-python's low-level API): continuous batching over its batch API.

One context, unified KV of as many tokens as kvos's pool, 64 sequence slots; each step packs the
decodes, then prompt chunks, into one llama_batch of at most token_budget tokens, as its server
does; n samples share the prompt's cells (llama_memory_seq_cp). The file's own weights (llama.cpp's
description of the file names their type), f16 K/V."""
from __future__ import annotations

import ctypes
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from userspace.bench import records
from userspace.bench.child import run_child


@dataclass
class _Request:
    spec: object                       # workload.BenchRequest
    samples: list                      # SampleRecord per sample
    seqs: list                         # llama seq ids, one per sample
    computed: int = 0                  # prompt tokens decoded so far
    next_token: dict = field(default_factory=dict)   # seq id -> token to feed next step
    rngs: list = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.spec.prompt_len

    @property
    def reserve(self) -> int:
        """KV cells the request can ever hold: the prompt once, every sample's output."""
        return self.spec.prompt_len + self.spec.output_len * self.spec.n


def run(workload, options, progress) -> dict:
    import llama_cpp as L

    from kernel.units import parse_bytes

    started = time.perf_counter()
    L.llama_backend_init()
    model_params = L.llama_model_default_params()
    # Weight repacking into "extra buffer types" (interleaved Q4_0 / Q4_K / Q8_0 rows for its AVX2 and
    # AVX-512 kernels) stays on, as in llama.cpp's own tools, except on a CPU with AMX: there 0.3.36's
    # AMX repack of Q4_1 weights crashes the first llama_decode (segfault), and its AVX-512 kernels run
    # instead. On this AVX2 VM the repack was worth +10-19% on one stream of a Q4_K_M file, nothing
    # measurable on the Q4_1 one (docs/performance.md, section 15).
    model_params.use_extra_bufts = not _cpu_has_amx()
    model = L.llama_model_load_from_file(options["gguf"].encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {options['gguf']}")
    desc = ctypes.create_string_buffer(128)
    L.llama_model_desc(model, desc, len(desc))
    weights = desc.value.decode(errors="replace").split(" ", 2)[-1]    # "llama 256M Q4_K - Medium" -> the type
    fp32_share = L.llama_model_size(model) / (4 * L.llama_model_n_params(model))
    n_layer, n_head_kv = L.llama_model_n_layer(model), L.llama_model_n_head_kv(model)
    head_dim = L.llama_model_n_embd(model) // L.llama_model_n_head(model)
    fp32_per_token = 2 * n_layer * n_head_kv * head_dim * 4
    f16_per_token = fp32_per_token // 2               # llama.cpp keeps K/V in f16 by default
    n_ctx = parse_bytes(options["memory"]) // fp32_per_token     # as many tokens as kvos's pool
    slots = min(options.get("llama_slots", 64), 256)
    budget = options.get("token_budget", 512)
    params = L.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, budget, budget
    params.n_seq_max, params.kv_unified = slots, True
    params.n_threads = params.n_threads_batch = options["threads"]
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    n_ctx = L.llama_n_ctx(ctx)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(budget, 0, 1)
    load_seconds = time.perf_counter() - started
    engine = _Engine(L, ctx, mem, batch, vocab, budget, workload.temperature)
    try:
        engine.warm_up(workload.requests[0].prompt[:8])
        samples = records.samples_of(workload)
        progress.phase("run", workload.generated_tokens)
        wall, cpu, peak_cells = engine.run(workload, samples, slots, n_ctx, progress)
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return records.result(
        "llama.cpp", samples, load_seconds=load_seconds, wall_seconds=wall, cpu_seconds=cpu,
        mode=f"llama-cpp-python {getattr(L, '__version__', '?')}, batched (llama_batch, {slots} slots, "
             f"{budget} tokens a step), unified KV of {n_ctx} tokens in f16, {weights} weights",
        kv_peak_bytes=peak_cells * f16_per_token, kv_capacity_bytes=n_ctx * f16_per_token,
        return_tokens=options.get("return_tokens", False),
        notes=[f"runs the GGUF's {weights} weights ({fp32_share:.2f} of the fp32 bytes), K/V in f16: tokens may "
               "differ from the fp32 systems'"])


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


class _Engine:
    """The step loop: admit, pack one batch, decode, choose tokens, retire finished sequences."""

    def __init__(self, L, ctx, mem, batch, vocab, budget, temperature):
        self.L, self.ctx, self.mem, self.batch = L, ctx, mem, batch
        self.vocab, self.budget, self.temperature = vocab, budget, temperature

    def warm_up(self, prompt) -> None:
        self._clear()
        self._add_tokens([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        self._decode()
        self.L.llama_memory_seq_rm(self.mem, 0, -1, -1)

    def run(self, workload, samples, slots, n_ctx, progress):
        by_request = {}
        for s in samples:
            by_request.setdefault(s.request, []).append(s)
        pending = deque(sorted(workload.requests, key=lambda r: r.arrival))
        free = list(range(slots - 1, -1, -1))
        active, reserved, done, peak_cells = [], 0, 0, 0
        t0, cpu0 = time.perf_counter(), records.cpu_time()
        while pending or active:
            now = time.perf_counter() - t0
            # serial: the next request is admitted when the previous one has ended, and arrives then
            while pending and (not active if workload.serial else pending[0].arrival <= now) \
                    and len(free) >= pending[0].n and reserved + _reserve_of(pending[0]) <= n_ctx:
                spec = pending.popleft()
                if workload.serial:
                    for s in by_request[spec.index]:
                        s.arrival = time.perf_counter() - t0
                rngs = [np.random.default_rng((spec.seed or 0) + j) for j in range(spec.n)]
                active.append(_Request(spec, by_request[spec.index], [free.pop() for _ in range(spec.n)],
                                       rngs=rngs))
                reserved += _reserve_of(spec)
            if not active:
                if pending and _reserve_of(pending[0]) > n_ctx:
                    raise RuntimeError(f"request {pending[0].index} needs {_reserve_of(pending[0])} KV cells; "
                                       f"the context has {n_ctx}")
                time.sleep(max(0.0, pending[0].arrival - (time.perf_counter() - t0)))
                continue
            rows = self._pack(active)
            self._decode()
            at = time.perf_counter() - t0
            for req, seq, index in rows:
                done += self._choose(req, seq, index, at)
            for req in [r for r in active if not r.prefilling and all(
                    len(s.token_times) >= s.output_len for s in r.samples)]:
                for seq in req.seqs:
                    self.L.llama_memory_seq_rm(self.mem, seq, -1, -1)
                    free.append(seq)
                active.remove(req)
                reserved -= req.reserve
            cells = sum(r.computed + sum(len(s.token_times) for s in r.samples) for r in active)
            peak_cells = max(peak_cells, cells)
            progress.update(done)
        progress.update(done, force=True)
        return time.perf_counter() - t0, records.cpu_time() - cpu0, peak_cells

    def _pack(self, active) -> list:
        """Fill the batch: decodes first, then prompt chunks. Returns (request, seq, row) to sample."""
        entries, rows, room = [], [], self.budget
        for req in active:
            for seq in list(req.next_token)[:room]:
                token = req.next_token.pop(seq)
                # the token fed is the sample's last one, at position prompt + generated - 1
                pos = req.spec.prompt_len + len(req.samples[req.seqs.index(seq)].token_times) - 1
                rows.append((req, seq, len(entries)))
                entries.append((token, pos, seq, True))
                room -= 1
        for req in active:
            if not req.prefilling or room == 0:
                continue
            chunk = min(room, req.spec.prompt_len - req.computed)
            for i in range(req.computed, req.computed + chunk):
                last = i == req.spec.prompt_len - 1
                if last:
                    rows.append((req, req.seqs[0], len(entries)))
                entries.append((req.spec.prompt[i], i, req.seqs[0], last))
            req.computed += chunk
            room -= chunk
        self._clear()
        self._add_tokens(entries)
        return rows

    def _choose(self, req, seq, row, at) -> int:
        """Tokens for the sample(s) the row's logits serve; returns how many were produced."""
        logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, row), shape=(self.vocab,))
        first = seq == req.seqs[0] and not req.samples[0].token_times
        targets = req.seqs if first else [seq]
        if first and len(req.seqs) > 1:        # the prompt's cells are shared by every sample's sequence
            for other in req.seqs[1:]:
                self.L.llama_memory_seq_cp(self.mem, req.seqs[0], other, -1, -1)
        produced = 0
        for target in targets:
            k = req.seqs.index(target)
            s = req.samples[k]
            if len(s.token_times) >= s.output_len:
                continue
            token = self._pick(logits, req.rngs[k])
            s.token_times.append(at)
            s.tokens = (s.tokens or []) + [token]
            produced += 1
            if len(s.token_times) < s.output_len:
                req.next_token[target] = token
            else:
                s.finish_reason = "length"
        return produced

    def _pick(self, logits, rng) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        p = np.exp(z - z.max())
        return int(rng.choice(len(p), p=p / p.sum()))

    def _clear(self) -> None:
        self.batch.n_tokens = 0

    def _add_tokens(self, entries) -> None:
        b = self.batch
        for token, pos, seq, logits in entries:
            i = b.n_tokens
            b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
            b.n_tokens = i + 1

    def _decode(self) -> None:
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (1: no KV slot for the batch)")


def _reserve_of(spec) -> int:
    return spec.prompt_len + spec.output_len * spec.n


if __name__ == "__main__":
    run_child(run)
