"""The benchmark's workloads as token ids: every system is handed the very same ids and lengths.

mixed: 64 chat requests, prompts uniform 16..256, outputs lognormal (mean 128, sd 128, 8..512),
numpy seed 1234: 9,023 prompt and 9,172 generated tokens. shared: the same behind one 200-token
system turn; sampling: 16 prompts, n=4, temperature 0.8; single: mixed's first 8 prompts, 128
tokens each, one at a time (serial: a request is handed over when the previous one has ended);
or a JSONL trace. EOS ends nothing."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kernel.errors import EINVAL, ENOENT, KvosError
from userspace.bench import texts
from userspace.jsonl import json_objects

MIXED_SEED = 1234
MIXED_REQUESTS = 64
PROMPT_RANGE = (16, 256)               # inclusive
OUTPUT_MEAN, OUTPUT_SD, OUTPUT_RANGE = 128, 128, (8, 512)
SHARED_PREFIX_TOKENS = 200
SAMPLING_PROMPTS, SAMPLING_N, SAMPLING_TEMPERATURE = 16, 4, 0.8
SINGLE_REQUESTS, SINGLE_OUTPUT = 8, 128
NAMES = ("mixed", "shared", "sampling", "single")


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt: list                       # token ids, the shared prefix (if any) included
    output_len: int                    # tokens to generate, per sample; EOS does not end a request
    arrival: float = 0.0               # seconds after the start of the run
    n: int = 1                         # samples of this prompt (the sampling workload)
    seed: int | None = None            # sampling seed of the first sample (temperature > 0 only)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


@dataclass
class Workload:
    name: str
    requests: list                     # BenchRequest, in spawn order
    temperature: float = 0.0           # 0: greedy
    prefix_len: int = 0                # leading tokens every request shares (the `shared` system turn)
    notes: list = field(default_factory=list)
    # One request at a time: each is handed over when the previous one has ended (its arrival is
    # then that moment, so TTFT is what one user waiting on an idle server sees). Arrivals are ignored.
    serial: bool = False

    @property
    def num_samples(self) -> int:
        return sum(r.n for r in self.requests)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens as the requests state them (a sampled prompt counts once)."""
        return sum(r.prompt_len for r in self.requests)

    @property
    def generated_tokens(self) -> int:
        return sum(r.output_len * r.n for r in self.requests)

    @property
    def has_arrivals(self) -> bool:
        return any(r.arrival > 0 for r in self.requests)

    def to_json(self) -> dict:
        return {"name": self.name, "temperature": self.temperature, "prefix_len": self.prefix_len,
                "notes": list(self.notes), "serial": self.serial, "requests": [asdict(r) for r in self.requests]}

    @classmethod
    def from_json(cls, d: dict) -> Workload:
        return cls(d["name"], [BenchRequest(**r) for r in d["requests"]], d["temperature"], d["prefix_len"],
                   d.get("notes", []), d.get("serial", False))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> Workload:
        return cls.from_json(json.loads(Path(path).read_text()))


# -- lengths -------------------------------------------------------------------------------------
def mixed_lengths(num: int = MIXED_REQUESTS, seed: int = MIXED_SEED) -> tuple[list, list]:
    """(prompt lengths, output lengths) of the mixed workload: prompts first, then outputs, one generator."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(PROMPT_RANGE[0], PROMPT_RANGE[1] + 1, num)
    sigma2 = math.log(1 + (OUTPUT_SD / OUTPUT_MEAN) ** 2)       # lognormal matched to mean and sd
    outputs = rng.lognormal(math.log(OUTPUT_MEAN) - sigma2 / 2, math.sqrt(sigma2), num)
    outputs = np.clip(np.rint(outputs), *OUTPUT_RANGE).astype(int)
    return [int(p) for p in prompts], [int(o) for o in outputs]


# -- token ids -------------------------------------------------------------------------------------
class ChatText:
    """Chat turns as token ids, cut to exact lengths, in the model's ChatML template.

    Turns are assembled from ids (role header + content ids + end marker), so a cut
    never re-tokenizes differently. The assembly is checked once against the
    model's own chat template; a model without ChatML gets plain text prompts."""

    def __init__(self, program):
        self.program = program
        special = getattr(program.tokenizer, "special_tokens", {})
        self.start, self.end = special.get("bos_token"), special.get("eos_token")
        self.chatml = bool(self.start and self.end) and self._matches_template()

    def _ids(self, text: str) -> list:
        return self.program.encode(text)

    def _head(self, role: str) -> list:
        return self._ids(f"{self.start}{role}\n") if self.chatml else []

    def _close(self) -> list:
        return self._ids(f"{self.end}\n") if self.chatml else []

    def _matches_template(self) -> bool:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there."}]
        try:
            want = self.program.apply_chat_template(messages)
        except KvosError:
            return False
        got = (self._ids(f"{self.start}system\n") + self._ids("Be brief.") + self._ids(f"{self.end}\n")
               + self._ids(f"{self.start}user\n") + self._ids("Hello there.") + self._ids(f"{self.end}\n")
               + self._ids(f"{self.start}assistant\n"))
        return got == want

    def turn(self, role: str, text: str, length: int, generation_prompt: bool) -> list:
        """A turn of exactly `length` ids: header, the text's first ids (repeated if short), end marker."""
        frame = self._head(role)
        tail = self._close() + (self._head("assistant") if generation_prompt else [])
        room = length - len(frame) - len(tail)
        if room < 1:
            raise KvosError(EINVAL, f"a {role} turn of {length} tokens has no room for text "
                                    f"(its markers take {len(frame) + len(tail)})")
        return frame + self.plain(text, room) + tail

    def plain(self, text: str, length: int) -> list:
        """The text's first `length` ids, the text repeated when it is shorter."""
        content = self._ids(text)
        while len(content) < length:
            content = content + self._ids("\n\n") + self._ids(text)
        return content[:length]

    @property
    def overhead(self) -> int:
        """Ids a user turn with the generation prompt spends on markers."""
        return len(self._head("user") + self._close() + self._head("assistant"))


def request_text(index: int) -> str:
    """A topic, a question and three paragraphs. (question, first paragraph) = (i mod 16, 3i mod 10)
    repeats only every 80 requests, and both come first: prompts differ from their first page on."""
    q = texts.QUESTIONS[index % len(texts.QUESTIONS)]
    start = (index * 3) % len(texts.PARAGRAPHS)
    paragraphs = [texts.PARAGRAPHS[(start + j) % len(texts.PARAGRAPHS)] for j in range(3)]
    return f"{texts.TOPICS[start]}. {q}\n\n" + "\n\n".join(paragraphs)


# -- the named workloads ---------------------------------------------------------------------------
def build(name: str, program, quick: bool = False, trace: str | None = None) -> Workload:
    """The workload `name` (or the trace file) as token ids of `program`'s tokenizer.
    quick: the first quarter of the requests (the same draws, so quick runs are a subset)."""
    chat = ChatText(program)
    if trace is not None:
        workload = load_trace(trace, chat)
    elif name == "mixed":
        workload = _mixed(chat, prefix=None)
    elif name == "shared":
        workload = _mixed(chat, prefix=chat.turn("system", texts.SYSTEM_PROMPT, SHARED_PREFIX_TOKENS, False))
    elif name == "sampling":
        workload = _sampling(chat)
    elif name == "single":
        workload = _single(chat)
    else:
        raise KvosError(ENOENT, f"no workload {name!r}: choose one of {', '.join(NAMES)} or --trace FILE")
    if not chat.chatml:
        workload.notes.append("the model's chat template is not ChatML: prompts are plain text")
    if quick:
        workload.requests = workload.requests[:max(1, -(-len(workload.requests) // 4))]
        workload.notes.append("quick: the first quarter of the requests")
    return workload


def _mixed(chat: ChatText, prefix: list | None) -> Workload:
    prompts, outputs = mixed_lengths()
    prefix = prefix or []
    requests = [BenchRequest(i, prefix + chat.turn("user", request_text(i), p, True), o)
                for i, (p, o) in enumerate(zip(prompts, outputs))]
    return Workload("shared" if prefix else "mixed", requests, prefix_len=len(prefix))


def _sampling(chat: ChatText) -> Workload:
    prompts, outputs = mixed_lengths()
    requests = [BenchRequest(i, chat.turn("user", request_text(i), p, True), o, n=SAMPLING_N, seed=1000 + i)
                for i, (p, o) in enumerate(zip(prompts[:SAMPLING_PROMPTS], outputs[:SAMPLING_PROMPTS]))]
    return Workload("sampling", requests, temperature=SAMPLING_TEMPERATURE,
                    notes=[f"n={SAMPLING_N} samples per prompt at temperature {SAMPLING_TEMPERATURE}: "
                           "systems draw different tokens, the lengths are the same"])


def _single(chat: ChatText) -> Workload:
    prompts, _ = mixed_lengths()
    requests = [BenchRequest(i, chat.turn("user", request_text(i), p, True), SINGLE_OUTPUT)
                for i, p in enumerate(prompts[:SINGLE_REQUESTS])]
    return Workload("single", requests, serial=True,
                    notes=["one request at a time: each is handed over when the previous one has ended"])


def load_trace(path: str, chat: ChatText) -> Workload:
    """A JSONL trace: one request a line, {"prompt_len": int} or {"prompt_tokens": [ids]},
    {"output_len": int}, optional {"arrival": seconds}. Lengths become text like `mixed`'s."""
    vocab = chat.program.vocab_size
    requests = []
    for where, row in json_objects(path):
        output = row.get("output_len")
        arrival = row.get("arrival", 0.0)
        if isinstance(output, bool) or not isinstance(output, int) or output < 1:
            raise KvosError(EINVAL, f"{where}: output_len must be an integer >= 1, got {output!r}")
        if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not 0 <= arrival < math.inf:
            raise KvosError(EINVAL, f"{where}: arrival must be a number of seconds >= 0, got {arrival!r}")
        if "prompt_tokens" in row:
            ids = row["prompt_tokens"]
            if not isinstance(ids, list) or not ids or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise KvosError(EINVAL, f"{where}: prompt_tokens must be a non-empty list of ids in [0, {vocab})")
        else:
            length = row.get("prompt_len")
            if isinstance(length, bool) or not isinstance(length, int) or length < 1:
                raise KvosError(EINVAL, f"{where}: prompt_len must be an integer >= 1 (or give prompt_tokens)")
            text = request_text(len(requests))
            # A prompt too short for the chat markers is plain text: the length is what the trace prescribes.
            ids = chat.turn("user", text, length, True) if length > chat.overhead else chat.plain(text, length)
        requests.append(BenchRequest(len(requests), list(ids), output, float(arrival)))
    if not requests:
        raise KvosError(EINVAL, f"{path}: the trace has no requests")
    requests.sort(key=lambda r: r.arrival)
    return Workload(f"trace:{Path(path).name}", [BenchRequest(i, r.prompt, r.output_len, r.arrival)
                                        for i, r in enumerate(requests)])
