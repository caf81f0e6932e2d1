"""hf-cb: transformers' own continuous batching (init_continuous_batching), paged KV on the CPU or a GPU.

Each request is added with its own max_new_tokens, eos_token_id=-1 and record_timestamps. Its pool
gets kvos's bytes (num_blocks), page size and token budget (max_batch_tokens); attention "sdpa"
(its paged path on the CPU) unless options say "paged|eager"."""
from __future__ import annotations

import time

from kernel.units import parse_bytes
from userspace.bench import records
from userspace.bench.child import run_child
from userspace.bench.systems.hf_common import kv_bytes_per_token, load_model


def run(workload, options, progress) -> dict:
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    attn = options.get("hf_attn", "sdpa")
    model, load_seconds = load_model(options, attn_implementation=attn)
    page_size = options.get("page_size", 16)
    per_token = kv_bytes_per_token(model)
    num_blocks = parse_bytes(options["memory"]) // (per_token * page_size)
    n = max(r.n for r in workload.requests)
    if any(r.n != n for r in workload.requests):
        raise ValueError("hf-cb takes one num_return_sequences for every request; the workload mixes n")
    sampling = workload.temperature > 0
    gen = GenerationConfig(max_new_tokens=max(r.output_len for r in workload.requests), do_sample=sampling,
                           num_return_sequences=n, eos_token_id=-1, pad_token_id=0)
    if sampling:
        gen.temperature, gen.top_k, gen.top_p = workload.temperature, 0, 1.0
    cb = ContinuousBatchingConfig(page_size=page_size, num_blocks=num_blocks,
                                  max_batch_tokens=options.get("token_budget", 512),
                                  use_cuda_graph=False, use_async_batching=False, allow_block_sharing=True,
                                  seed=workload.requests[0].seed if sampling else None)
    hints = WorkloadHints(max_prompt_length=max(r.prompt_len for r in workload.requests),
                          max_generated_length=max(r.output_len for r in workload.requests),
                          num_requests=workload.num_samples)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb,
                                             workload_hints=hints)
    manager.start()
    try:
        with torch.inference_mode():
            _warm_up(manager, workload)
            cache = manager.batch_processor.cache
            capacity = cache.num_sectors * cache.bytes_per_sector
            samples = records.samples_of(workload)
            wall, cpu, kv_peak = _run(manager, workload, samples, cache, capacity, progress)
    finally:
        manager.stop(block=True, timeout=30)
    return records.result(
        "hf-cb", samples, load_seconds=load_seconds, wall_seconds=wall, cpu_seconds=cpu,
        mode=f"init_continuous_batching, attention {attn!r}, pages of {page_size} tokens, "
             f"max_batch_tokens {cb.max_batch_tokens}, fp32"
             + ("" if options.get("device", "cpu") == "cpu" else f" on {options['device']}, no CUDA graphs"),
        kv_peak_bytes=kv_peak, kv_capacity_bytes=capacity, return_tokens=options.get("return_tokens", False),
        extra={"num_blocks": num_blocks, "attn_implementation": attn},
        notes=["KV peak: pool bytes in use, sampled every 50 ms by the collecting thread"])


def _warm_up(manager, workload) -> None:
    """One short request before the clock starts (eight tokens fill no page: nothing is cached)."""
    rid = manager.add_request(workload.requests[0].prompt[:8], request_id="warm-up", max_new_tokens=2,
                              eos_token_id=-1)
    remaining = manager.num_return_sequences
    while remaining:
        result = manager.get_result(timeout=60)
        if result is None:
            raise RuntimeError("hf-cb: the warm-up request produced nothing in 60 s")
        if result.request_id.startswith(rid) and result.is_finished():
            remaining -= 1


def _run(manager, workload, samples, cache, capacity, progress):
    """Hand every request over at its arrival, collect results; returns (wall, CPU s, peak KV bytes)."""
    by_id = {}
    for s in samples:
        rid = f"r{s.request}"
        by_id[rid if s.sample == 0 else f"{rid}__child#{s.sample - 1}"] = s
    pending = sorted(workload.requests, key=lambda r: r.arrival)
    progress.phase("run", workload.generated_tokens)
    by_request = {}
    for s in samples:
        by_request.setdefault(s.request, []).append(s)
    done = kv_peak = 0
    finished = handed = 0
    t0, cpu0 = time.perf_counter(), records.cpu_time()
    perf_t0 = t0
    while finished < len(samples):
        now = time.perf_counter() - t0
        # serial: the next request is added once every earlier one has finished, and arrives then
        while pending and (finished == handed if workload.serial else pending[0].arrival <= now):
            r = pending.pop(0)
            handed += r.n
            if workload.serial:
                for s in by_request[r.index]:
                    s.arrival = time.perf_counter() - perf_t0
            manager.add_request(r.prompt, request_id=f"r{r.index}", max_new_tokens=r.output_len,
                                record_timestamps=True, eos_token_id=-1)
        kv_peak = max(kv_peak, capacity - int(cache.compute_free_capacity(relative=False)))
        result = manager.get_result(timeout=0.05)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("hf-cb: the generation thread stopped before every request finished")
            continue
        if not result.is_finished():
            continue
        if result.error is not None:
            raise RuntimeError(f"hf-cb: request {result.request_id} failed: {result.error}")
        s = by_id[result.request_id]
        s.tokens = list(result.generated_tokens)
        s.token_times = [t - perf_t0 for t in (result.timestamps or [])]
        s.finish_reason = "length"
        if len(s.token_times) != len(s.tokens):
            raise RuntimeError(f"hf-cb: {len(s.tokens)} tokens but {len(s.token_times)} timestamps")
        finished += 1
        done += len(s.tokens)
        progress.update(done)
    wall, cpu = time.perf_counter() - t0, records.cpu_time() - cpu0
    progress.update(done, force=True)
    return wall, cpu, kv_peak


if __name__ == "__main__":
    run_child(run)
