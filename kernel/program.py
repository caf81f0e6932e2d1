"""What the kernel knows of a model program, and how it finds one (binfmt).

A program is any object with the Program interface below; the simulated device also reads the
optional step_cost and resident_weight_bytes. Loaders turn a model spec into a program: BINFMTS,
from the "kvos.programs" entry points (setup.py) and register_binfmt(). The kernel never imports
userspace; loaders cache what they load, so tenants running one model share its weights.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from numbers import Integral

import torch

from kernel.batch import ForwardBatch
from kernel.errors import EINVAL, ENOENT, ENOMEM, KernelPanic, KvosError
from kernel.kvcache import KVShape, KVView


@dataclass(frozen=True)
class ProgramCost:
    """What a forward pass costs, in the model's own terms (a program's step_cost is built from it)."""
    num_params: int              # parameters touched per token (embedding lookup excluded)
    weight_bytes: int            # bytes of weights read per forward step
    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int

    @property
    def linear_flops_per_token(self) -> int:
        return 2 * self.num_params

    def attention_flops(self, q_len: int, kv_len: int) -> int:
        """QK^T and PV for q_len queries over kv_len keys, all layers and heads."""
        return 4 * self.num_layers * self.num_heads * self.head_dim * q_len * kv_len


class Program(ABC):
    """A model the kernel can run: a KV shape, a forward pass and a tokenizer.

    A program for the simulated device (kernel/devices/sim.py) offers two more attributes, which no
    other device reads: step_cost, a costmodel.ModelCost the device prices every forward pass with
    (without it simulate_step panics), and resident_weight_bytes, the bytes its weights hold in
    device memory (default_memory subtracts them; without it, cost.weight_bytes)."""

    name: str                    # the name it was loaded under
    identity: bytes              # names page-cache pages: same weights -> same identity
    kv_shape: KVShape
    max_context: int
    vocab_size: int
    eos_token_ids: frozenset
    cost: ProgramCost

    # A program that runs on another's text (a LoRA adapter on its base model) names that program:
    # the step forwards its processes in one batch with the base's and the base's other adapters',
    # through base.mixed(). None: its processes have a forward of their own.
    base_program: Program | None = None

    @abstractmethod
    def forward(self, batch: ForwardBatch, kv: KVView) -> torch.Tensor:
        """float32 logits (num_samples, vocab_size) for batch.sample_indices, in that order."""

    def mixed(self, segments: list) -> Program:
        """A program whose forward runs this step's batch of this program's processes and of programs
        whose base_program this is: segments are (first row, end row, program) for the rows of the
        latter (the batch's token rows, one process's contiguous). Only a program that others name
        as their base implements it."""
        raise KernelPanic(f"{self.name} runs no other program's rows")

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens added)."""

    @abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """Text of token ids, special tokens skipped."""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` adds to a process's output; the kernel joins them and never decodes
        (kernel/output.py). This default decodes the token alone, which splits multi-byte characters
        and may drop spaces: a program with a tokenizer returns an exact table, built at load."""
        try:
            return self._decoded_bytes[token_id]                      # decoded once per token id
        except AttributeError:
            self._decoded_bytes = {}
        except KeyError:
            pass
        piece = self._decoded_bytes[token_id] = self.decode([token_id]).encode()
        return piece

    def check_tokens(self, token_ids, what: str = "prompt") -> None:
        """Refuse a prompt this program cannot run, before it is admitted (the forward pass checks nothing).

        EINVAL: empty, not integers, or an id outside the vocabulary. ENOMEM: longer than the context.
        `what` names the argument that held them in the reason (a prompt, a write's input, a prediction).
        """
        if isinstance(token_ids, torch.Tensor):
            if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool or token_ids.dim() != 1:
                raise KvosError(EINVAL, f"{what}: token ids must be a 1-D integer tensor, got {token_ids.dtype} "
                                        f"of shape {tuple(token_ids.shape)}")
            token_ids = token_ids.tolist()
        if not isinstance(token_ids, (list, tuple)):
            raise KvosError(EINVAL, f"{what}: token ids must be a list of integers, got {type(token_ids).__name__}")
        if not token_ids:
            raise KvosError(EINVAL, f"empty {what}: it needs at least one token")
        if not all(isinstance(t, Integral) and not isinstance(t, bool) for t in token_ids):
            bad = next(t for t in token_ids if not isinstance(t, Integral) or isinstance(t, bool))
            raise KvosError(EINVAL, f"{what}: token ids must be integers, got {bad!r}")
        low, high = min(token_ids), max(token_ids)
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise KvosError(EINVAL, f"{what}: token id {bad} is outside the vocabulary of {self.name} "
                                    f"(0..{self.vocab_size - 1})")
        if len(token_ids) > self.max_context:
            raise KvosError(ENOMEM, f"{what} of {len(token_ids)} tokens is longer than the context of "
                                    f"{self.name} ({self.max_context} tokens)")

    # The template's way with tools: None (it takes none), "hermes" (it lists them and the model calls
    # one as <tool_call>{"name": ..., "arguments": ...}</tool_call>), or "other" (a format of its own).
    chat_tools: str | None = None
    # What a client needs to tokenize or render as the model does (tenantinfo reports them): the text of
    # its special tokens by role ({"bos_token": "<s>", "eos_token": "</s>", ...}) and its chat template's
    # text (Jinja), when it has them.
    special_tokens: dict = {}
    chat_template: str | None = None

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        """Text of a chat (list of {"role", "content"}) in the model's own template, which is given
        `tools` (EINVAL for a template that takes none)."""
        if tools:
            raise KvosError(EINVAL, f"the chat template of {self.name} takes no tools")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None) -> list[int]:
        """Token ids of a chat in the model's own template."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tools))


BINFMTS: list = []          # callables (spec, device) -> Program or None
_entry_points_loaded = False


def register_binfmt(loader, first: bool = False) -> None:
    """Add a loader: loader(spec, device) returns a Program, or None when spec is not its kind.
    first=True puts it ahead of the others, to claim names another loader also answers for."""
    if loader in BINFMTS:
        BINFMTS.remove(loader)
    BINFMTS.insert(0, loader) if first else BINFMTS.append(loader)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points
    for ep in entry_points(group="kvos.programs"):
        register_binfmt(ep.load())


def exec_program(spec, device) -> Program:
    """Resolve a model spec (a Program, a name, a path) into a loaded program for `device`."""
    if isinstance(spec, Program):
        attach = getattr(device, "attach_program", None)
        if attach is not None:
            attach(None, spec)                          # known to it, or refused (EINVAL)
        return spec
    if not isinstance(spec, str) or not spec:
        raise KvosError("EINVAL", f"model must be a name or a path, got {spec!r}")
    _load_entry_points()
    for loader in BINFMTS:
        program = loader(spec, device)
        if program is not None:
            attach = getattr(device, "attach_program", None)
            if attach is not None:
                attach(spec, program)                     # a tensor-parallel device's other ranks load it too
            return program
    # the hint names what userspace's loader answers for on this kind of device
    hint = ("give a model as a name (smollm2-135m, tiny-llama), a path (a .gguf file or a Hugging Face folder) "
            "or a hub id (ORG/NAME[@REVISION], ORG/NAME:FILE.gguf)" if getattr(device, "has_tensors", True)
            else "try a simulated model such as 'llama-2-7b', or a config.json path")
    raise KvosError(ENOENT, f"no program named {spec[:200]!r}; {hint}")
