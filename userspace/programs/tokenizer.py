"""Text <-> token ids and chat templates, from a model file's own vocabulary.

The BPE itself is the `tokenizers` library's; a GGUF's byte-level vocabulary,
merges and pre-tokenizer name are handed to it the way Hugging Face's GGUF
conversion does, so ids match HF's tokenizer for the same file exactly. Chat
templates are rendered with jinja2 in a sandbox set up like transformers'.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cached_property

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from kernel.errors import EINVAL, KvosError

# One thread pool in the process (the kernel's): the tokenizer runs in the caller's thread only.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Longer texts are tokenized without holding the GIL, so the kernel's loop thread keeps stepping
# (a 1 MB prompt kept it from running for a second); shorter ones avoid the ~0.1 ms that costs.
LONG_TEXT = 16_384

# llama.cpp token types (gguf TokenType) that become added tokens
CONTROL, USER_DEFINED = 3, 4

# Pre-tokenizer split rules by tokenizer.ggml.pre; any other name uses GPT-2's rule, as in transformers.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}

# Used when a model file carries no chat template: ChatML, which SmolLM2 and Qwen2 speak.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int] | None,
                   pre_type: str | None) -> Tokenizer:
    """A byte-level BPE tokenizer from GGUF vocabulary data (tokenizer.ggml.model == "gpt2")."""
    alphabet_set = set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {}
    for index, token in enumerate(tokens):
        # Tokens outside the byte alphabet (rare mislabelled specials) are respelled byte by byte, as HF does.
        key = token if set(token) <= alphabet_set else spell.pre_tokenize_str(token)[0][0]
        vocab[key] = index
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(pre_type or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    if token_types:
        special = [AddedToken(t, normalized=False, special=True)
                   for t, kind in zip(tokens, token_types) if kind == CONTROL and set(t) <= alphabet_set]
        plain = [AddedToken(t, normalized=False, special=False)
                 for t, kind in zip(tokens, token_types) if kind == USER_DEFINED and t in vocab]
        backend.add_special_tokens(special)
        backend.add_tokens(plain)
    return backend


def token_bytes_table(backend: Tokenizer) -> list[bytes]:
    """Per token id, the bytes it contributes to decoded text. Byte-level BPE (GPT-2, LLaMA-3,
    Qwen2, SmolLM2): the byte alphabet mapped back. SentencePiece-style (Metaspace, byte-fallback
    <0xNN> tokens): the piece with its spaces, or the byte itself. Added tokens: their content, or
    nothing when special. Any other decoder: the token decoded on its own."""
    size = backend.get_vocab_size(with_added_tokens=True)
    table = [b""] * size
    # The decoder's own JSON, not the whole tokenizer's (to_str() of a 49k vocabulary is ~50 ms).
    decoder = backend.decoder
    kind = json.loads(decoder.__getstate__()) if decoder is not None else {}
    kinds = {d.get("type") for d in kind.get("decoders", [kind])}
    alphabet = _bytes_to_unicode()
    # Byte-level tokens are mapped back with two str.translate calls (C loops) instead of a generator
    # per character: one maps each alphabet character to the latin-1 character of its byte, the other
    # deletes the alphabet, so that what is left says whether the token is all alphabet.
    to_bytes = str.maketrans({c: chr(b) for b, c in enumerate(alphabet)})
    outside = str.maketrans({c: None for c in alphabet})
    for token, index in backend.get_vocab(with_added_tokens=False).items():
        if "ByteLevel" in kinds:
            table[index] = (token.translate(to_bytes).encode("latin-1") if not token.translate(outside)
                            else token.encode())
        elif "ByteFallback" in kinds and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            table[index] = bytes([int(token[3:5], 16)])
        elif kinds & {"Metaspace", "Replace", "ByteFallback"}:
            table[index] = token.replace("\u2581", " ").encode()
        else:
            table[index] = backend.decode([index], skip_special_tokens=False).encode()
    for index, added in backend.get_added_tokens_decoder().items():
        table[index] = b"" if added.special else added.content.encode()
    return table


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte alphabet: the printable character that stands for each byte 0-255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


class TextTokenizer:
    """What a program needs of its tokenizer: encode, decode, render a chat."""

    def __init__(self, backend: Tokenizer, chat_template: str | None = None, special_tokens: dict | None = None):
        self.backend = backend
        self.chat_template = chat_template or CHATML_TEMPLATE
        # bos_token, eos_token, ... as strings: chat templates refer to them by these names
        self.special_tokens = dict(special_tokens or {})

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise KvosError(EINVAL, f"text to encode must be a string, got {type(text).__name__}")
        if len(text) > LONG_TEXT:         # encode() keeps the GIL for all of it; encode_batch() lets go
            return self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=True)

    @cached_property
    def vocab_bytes(self) -> list[bytes]:
        """Each token id's bytes, so that joining them gives what decode() gives (special tokens are
        empty): the kernel builds a process's output from this table and never runs the tokenizer."""
        return token_bytes_table(self.backend)

    @cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of input one token can stand for (added tokens match their text)."""
        added = [len(t.content.encode()) for t in self.backend.get_added_tokens_decoder().values()]
        return max([*map(len, self.vocab_bytes), *added], default=0)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise KvosError(EINVAL, "a chat must be a list of {'role': ..., 'content': ...} dicts")
        extra = {}
        if tools:
            if self.chat_tools is None:
                raise KvosError(EINVAL, "the model's chat template takes no tools (it never reads 'tools')")
            extra["tools"] = tools
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens, **extra)
        except Exception as exc:    # a template error is the caller's chat not fitting the model's template
            raise KvosError(EINVAL, f"chat template: {exc}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, tools))

    @cached_property
    def chat_tools(self) -> str | None:
        """How the template deals with tools: None when it never reads the `tools` variable; "hermes"
        when it also spells calls as <tool_call> JSON </tool_call> (Qwen2, Hermes, SmolLM3); else "other"."""
        import jinja2.meta
        if "tools" not in jinja2.meta.find_undeclared_variables(self._template.environment.parse(self.chat_template)):
            return None
        return "hermes" if "<tool_call>" in self.chat_template else "other"

    @cached_property
    def _template(self):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        # The environment transformers renders chat templates in, so both give the same text.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateError as exc:
            raise KvosError(EINVAL, f"the model's chat template does not compile: {exc}") from None

    # -- persistence (the converted cache and Hugging Face folders) ----------
    def save(self, path) -> None:
        self.backend.save(str(path))

    @classmethod
    def load(cls, path, chat_template=None, special_tokens=None) -> TextTokenizer:
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise KvosError(EINVAL, f"{path}: not a readable tokenizer.json ({exc})") from None
        return cls(backend, chat_template, special_tokens)
