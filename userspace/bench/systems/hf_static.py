"""hf-static: transformers `generate` on static padded batches, the way most scripts serve.

Requests go in workload order, 16 sequences a batch (a request's n samples together), left-padded,
each batch running to its longest output. A stopping criterion stamps every step. A batch starts
once its last request has arrived and the previous batch is done (serial workloads: batches of one,
each handed over when the previous one has ended)."""
from __future__ import annotations

import time

from userspace.bench import records
from userspace.bench.child import run_child
from userspace.bench.systems.hf_common import load_model, pad_token_id
from userspace.bench.workloads import BenchRequest


def run(workload, options, progress) -> dict:
    import torch
    from transformers import GenerationConfig, StoppingCriteria

    model, load_seconds = load_model(options)
    pad = pad_token_id(model)
    # serial (the `single` workload): one request at a time, so batches of one
    batch_size = 1 if workload.serial else options.get("hf_batch", 16)
    samples = records.samples_of(workload)
    by_request = {}
    for s in samples:
        by_request.setdefault(s.request, []).append(s)

    class StepClock(StoppingCriteria):
        """Called once per generated token of the batch: the time every row's token appeared."""

        def __init__(self, t0, on_step):
            self.t0, self.on_step, self.times = t0, on_step, []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter() - self.t0)
            self.on_step(len(self.times))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def generate(requests, t0, on_step):
        n = requests[0].n
        longest = max(r.prompt_len for r in requests)
        ids = torch.full((len(requests), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), longest), dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, longest - r.prompt_len:] = torch.tensor(r.prompt)
            mask[row, longest - r.prompt_len:] = 1
        config = GenerationConfig(max_new_tokens=max(r.output_len for r in requests), min_new_tokens=0,
                                  do_sample=workload.temperature > 0, num_return_sequences=n,
                                  eos_token_id=None, pad_token_id=pad, return_dict_in_generate=True,
                                  use_cache=True)
        if workload.temperature > 0:
            config.temperature, config.top_k, config.top_p = workload.temperature, 0, 1.0
            torch.manual_seed(requests[0].seed or 0)
        clock = StepClock(t0, on_step)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 generation_config=config, stopping_criteria=[clock])
        return out, clock.times, longest

    # Warm-up: first-call costs of torch, before the clock starts.
    warm = workload.requests[0]
    generate([BenchRequest(0, warm.prompt[:8], 2)], time.perf_counter(), lambda _: None)

    batches, current = [], []
    for r in workload.requests:
        if current and sum(x.n for x in current) + r.n > batch_size:
            batches.append(current)
            current = []
        current.append(r)
    if current:
        batches.append(current)

    progress.phase("run", workload.generated_tokens)
    done = slots = useful = prompt_slots = 0
    kv_peak = 0
    t0, cpu0 = time.perf_counter(), records.cpu_time()
    for batch in batches:
        wait = max(r.arrival for r in batch) - (time.perf_counter() - t0)
        if wait > 0 and not workload.serial:
            time.sleep(wait)
        rows = [s for r in batch for s in by_request[r.index]]
        if workload.serial:                 # handed over now, when the previous request has ended
            for s in rows:
                s.arrival = time.perf_counter() - t0

        def on_step(step, rows=rows, base=done):
            progress.update(base + sum(min(step, s.output_len) for s in rows))

        out, times, longest = generate(batch, t0, on_step)
        kv_peak = max(kv_peak, _cache_bytes(out.past_key_values))
        sequences = out.sequences.tolist()
        for row, s in enumerate(rows):
            s.token_times = times[:s.output_len]
            s.tokens = sequences[row][longest:longest + s.output_len]
            s.finish_reason = "length"
        new = len(times)
        done += sum(s.output_len for s in rows)
        slots += new * len(rows)
        useful += sum(s.output_len for s in rows)
        prompt_slots += longest * len(batch)
    wall, cpu = time.perf_counter() - t0, records.cpu_time() - cpu0
    progress.update(done, force=True)
    padding = 1 - useful / slots if slots else 0.0
    prompt_padding = 1 - workload.prompt_tokens / prompt_slots if prompt_slots else 0.0
    return records.result(
        "hf-static", samples, load_seconds=load_seconds, wall_seconds=wall, cpu_seconds=cpu,
        mode=f"generate, static batches of {batch_size}, left padding, fp32"
             + ("" if options.get("device", "cpu") == "cpu" else f" on {options['device']}"),
        kv_peak_bytes=kv_peak, return_tokens=options.get("return_tokens", False),
        extra={"padding_share": padding, "prompt_padding_share": prompt_padding, "batches": len(batches)},
        notes=[f"{padding:.0%} of generated slots are padding behind each batch's longest request"])


def _cache_bytes(cache) -> int:
    """Bytes of a finished batch's KV cache (its largest size: the cache only grows)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return 0
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


if __name__ == "__main__":
    run_child(run)
