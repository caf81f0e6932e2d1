"""Workloads for the simulator: request lengths, arrivals, shared prefixes, as seeded data.

A Request: arrival, prompt and output lengths, optional shared prefix, n samples or a beam
width, and the budget announced at spawn. Named presets (sources in docs/simulator.md), Poisson
or burst arrivals, JSONL traces of the same fields, and token ids derived from a seed.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from kernel.errors import EINVAL, ENOENT, KvosError
from userspace.jsonl import json_objects


@dataclass(frozen=True)
class Request:
    arrival: float                   # seconds (virtual) after the start of the run
    prompt_len: int                  # tokens, the shared prefix included
    output_len: int                  # tokens the request generates (its EOS comes after exactly this many)
    prefix_id: str | int | None = None   # requests with one prefix id start with the same prefix_len tokens
    prefix_len: int = 0
    n: int = 1                       # parallel samples of one prompt
    beam_width: int = 0              # > 1: beam search of this width (output_len tokens per beam)
    max_tokens: int | None = None    # budget announced at spawn (what prealloc reserves); None: output_len

    @property
    def budget(self) -> int:
        return self.output_len if self.max_tokens is None else self.max_tokens

    def check(self, where: str = "request") -> None:
        def positive_int(name, value, lo=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise KvosError(EINVAL, f"{where}: {name} must be an integer >= {lo}, got {value!r}")
        if isinstance(self.arrival, bool) or not isinstance(self.arrival, (int, float)) or \
                not math.isfinite(self.arrival) or self.arrival < 0:
            raise KvosError(EINVAL, f"{where}: arrival must be a finite number of seconds >= 0, got {self.arrival!r}")
        positive_int("prompt_len", self.prompt_len)
        positive_int("output_len", self.output_len)
        positive_int("prefix_len", self.prefix_len, 0)
        positive_int("n", self.n)
        positive_int("beam_width", self.beam_width, 0)
        if self.max_tokens is not None:
            positive_int("max_tokens", self.max_tokens, self.output_len)
        if self.prefix_len > self.prompt_len:
            raise KvosError(EINVAL, f"{where}: prefix_len {self.prefix_len} exceeds prompt_len {self.prompt_len}")
        if self.prefix_len and self.prefix_id is None:
            raise KvosError(EINVAL, f"{where}: prefix_len without a prefix_id")
        if self.n > 1 and self.beam_width > 1:
            raise KvosError(EINVAL, f"{where}: a request samples n > 1 or runs a beam search, not both")


@dataclass(frozen=True)
class Lengths:
    """A length distribution: lognormal with the given mean and standard deviation (or fixed),
    rounded and clipped to [lo, hi]. Clipping moves the moments a little; runs report them."""
    mean: float
    sd: float = 0.0
    lo: int = 1
    hi: int = 2048

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if self.sd <= 0:
            values = np.full(size, self.mean)
        else:
            sigma2 = math.log(1 + (self.sd / self.mean) ** 2)     # lognormal matched to mean and sd
            values = rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2), size)
        return np.clip(np.rint(values), self.lo, self.hi).astype(int)


@dataclass(frozen=True)
class Preset:
    name: str
    prompt: Lengths
    output: Lengths
    source: str


# Where a source gives a mean but no spread, the spread is an assumption: sd = mean (cv 1).
PRESETS = {
    "sharegpt": Preset("sharegpt", Lengths(161, 161), Lengths(350, 400),
                       "outputs: the seed article (ShareGPT mean ~350, sd ~400); prompts: vLLM paper's ShareGPT "
                       "mean input 161, sd assumed = mean"),
    "sharegpt-vllm": Preset("sharegpt-vllm", Lengths(161, 161), Lengths(338, 338),
                            "vLLM paper (SOSP'23) ShareGPT: mean input 161, mean output 338; sd assumed = mean"),
    "alpaca": Preset("alpaca", Lengths(19, 19), Lengths(59, 59),
                     "vLLM paper (SOSP'23) Alpaca: mean input 19, mean output 59; sd assumed = mean"),
    "azure-conv": Preset("azure-conv", Lengths(1155, 1109, hi=8192), Lengths(211, 163, hi=1000),
                         "Azure LLM inference trace 2023, conversation (19,366 requests): prompts mean 1,155 "
                         "sd 1,109, outputs mean 211 sd 163 (at most 1,000)"),
}


def generate(preset: str | Preset, num: int, rate: float | None = None, seed: int = 0, *,
             arrival: str = "poisson", n: int = 1, beam_width: int = 0, max_tokens: int | None = None,
             prefix_groups: int = 0, prefix_len: int = 0, max_total: int | None = None) -> list:
    """`num` requests of a preset. arrival: "poisson" at `rate` requests/s, or "burst" (all at
    0). max_tokens: the budget announced at spawn (>= each output). prefix_groups > 0: request i
    starts with prefix i % prefix_groups of prefix_len tokens. max_total caps prompt + output."""
    p = PRESETS.get(preset) if isinstance(preset, str) else preset
    if p is None:
        raise KvosError(ENOENT, f"no workload preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise KvosError(EINVAL, f"num must be a positive integer, got {num!r}")
    rng = np.random.default_rng(seed)
    prompts = p.prompt.sample(rng, num)
    outputs = p.output.sample(rng, num)
    if arrival == "poisson":
        if rate is None or not rate > 0:
            raise KvosError(EINVAL, f"poisson arrivals need a rate > 0 requests/s, got {rate!r}")
        times = np.cumsum(rng.exponential(1.0 / rate, num))
    elif arrival == "burst":
        times = np.zeros(num)
    else:
        raise KvosError(EINVAL, f"arrival must be 'poisson' or 'burst', got {arrival!r}")
    out = []
    for i in range(num):
        prompt, output = int(prompts[i]), int(outputs[i])
        if prefix_groups:
            prompt = max(prompt, prefix_len + 1)
        if max_total is not None and prompt + output > max_total:
            output = max(1, max_total - prompt)
            prompt = min(prompt, max_total - output)
        budget = None if max_tokens is None else max(max_tokens, output)
        out.append(Request(float(times[i]), prompt, output,
                           prefix_id=(i % prefix_groups) if prefix_groups else None,
                           prefix_len=prefix_len if prefix_groups else 0,
                           n=n, beam_width=beam_width, max_tokens=budget))
    return out


def with_budget(requests: list, max_tokens: int) -> list:
    """The same requests announcing `max_tokens` at spawn (at least each one's output)."""
    return [replace(r, max_tokens=max(max_tokens, r.output_len)) for r in requests]


def length_stats(requests: list) -> dict:
    prompts = np.array([r.prompt_len for r in requests])
    outputs = np.array([r.output_len for r in requests])
    return {"requests": len(requests), "prompt_mean": float(prompts.mean()), "prompt_sd": float(prompts.std()),
            "output_mean": float(outputs.mean()), "output_sd": float(outputs.std()),
            "output_max": int(outputs.max())}


# -- token ids ------------------------------------------------------------------------------
def prompt_tokens(request: Request, index: int, vocab_size: int, seed: int = 0, copy: int = 0) -> list:
    """Token ids of request `index`: its shared prefix (the same for every request with its
    prefix_id), then ids of its own. `copy` > 0 gives another copy different ids throughout
    (a request that must not share pages with its siblings). Ids avoid 0..2 (special tokens)
    and the last id (the sim programs' filler token)."""
    low, high = 3, vocab_size - 1
    tokens = []
    if request.prefix_len and not copy:
        key = request.prefix_id if isinstance(request.prefix_id, int) else _stable_hash(str(request.prefix_id))
        tokens = np.random.default_rng([seed, 1, key]).integers(low, high, request.prefix_len).tolist()
    own = request.prompt_len - len(tokens)
    tokens += np.random.default_rng([seed, 2, index, copy]).integers(low, high, own).tolist()
    return tokens


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


# -- JSONL traces -----------------------------------------------------------------------------
_FIELDS = {"arrival", "prompt_len", "output_len", "prefix_id", "prefix_len", "n", "beam_width", "max_tokens"}


def load_trace(path) -> list:
    """Requests from a JSONL file, one object a line with the fields of Request (blank lines
    and lines starting with # are skipped). EINVAL names the line of the first bad entry."""
    requests = []
    for where, obj in json_objects(path):
        unknown = sorted(set(obj) - _FIELDS)
        if unknown:
            raise KvosError(EINVAL, f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_FIELDS))})")
        missing = sorted({"arrival", "prompt_len", "output_len"} - set(obj))
        if missing:
            raise KvosError(EINVAL, f"{where}: missing field {missing[0]!r}")
        request = Request(**obj)
        request.check(where)
        requests.append(request)
    if not requests:
        raise KvosError(EINVAL, f"{path}: the trace holds no request")
    return sorted(requests, key=lambda r: r.arrival)


def save_trace(path, requests: list) -> None:
    defaults = Request(0.0, 1, 1)
    with open(path, "w") as f:
        for r in requests:
            row = {k: v for k, v in asdict(r).items()
                   if k in ("arrival", "prompt_len", "output_len") or v != getattr(defaults, k)}
            f.write(json.dumps(row) + "\n")
