"""The binfmt handler for LLaMA-family programs ("kvos.programs" entry point `llama`).

load(spec, device) answers for "tiny-llama", "smollm2-135m", a .gguf path, a Hugging Face
folder and a hub id (ORG/NAME[@REVISION][:FILE.gguf], hub.py) on cpu and cuda, and for the
simulator's models on sim devices (sim.py); None for anything else, so other loaders get their
turn. Loaded programs are cached by (weights digest, device, dtype) while anyone holds them:
tenants running one model share one copy of its weights.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import weakref
from pathlib import Path

import torch

from kernel.errors import EINVAL, ENODEV, ENOENT, KvosError
from userspace.programs import converted, fetch, gguf_blocks, gguf_file, hf_folder, hub, lora, qcache, sim, tiny
from userspace.programs.cachedir import file_digest
from userspace.programs.llama import LlamaProgram, fuse_hf_weights, layer_loop

TINY_NAME = "tiny-llama"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
WEIGHTS = ("float32", "gguf")    # what the linear layers hold: widened float32, or the GGUF's own blocks

log = logging.getLogger("kvos.programs")
_programs: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_lock = threading.Lock()     # one load at a time: two tenants asking at once still get one copy


def load(spec, device):
    """binfmt entry: a Program for spec on device, or None when spec is not a LLaMA-family model.

    On a simulated device a model is its description, so "smollm2-135m" there is the sim preset
    and a config.json path is read without weights; names the simulator does not know are None."""
    if getattr(device, "kind", None) == "sim":
        return sim.load(spec, device)
    if not isinstance(spec, str) or not claims(spec):
        return None
    return load_program(spec, device)


def claims(spec: str) -> bool:
    parts = lora.split(spec)
    if parts is not None:
        return claims(parts[0])
    if spec == TINY_NAME or spec in fetch.MODELS:
        return True
    if _too_long(spec):
        return False
    path = Path(spec).expanduser()
    return spec.endswith(".gguf") or hf_folder.is_hf_folder(path) or hub.parse(spec) is not None


def _too_long(spec: str) -> bool:
    """Whether spec cannot name a file (a part over 255 bytes, or 4,096 in all): asking the file
    system about it would be an OSError, not an answer."""
    return len(spec.encode()) > 4096 or any(len(part.encode()) > 255 for part in spec.split("/"))


def load_program(spec: str, device="cpu", dtype=None, matmul=None, kv=None, weights=None) -> LlamaProgram:
    """Load (or share) the program named by spec. device: a TorchDevice, torch.device or name.

    dtype: of activations (float32 on the CPU). matmul: of the linear layers' weights and GEMMs
    (default $KVOS_MATMUL, else dtype); bfloat16 on the CPU trades exact agreement with a float32
    reference for 2 to 4x faster GEMMs where the CPU has AMX. kv: of the KV cache (default
    $KVOS_KV, else dtype); bfloat16 on the CPU halves the bytes attention reads and the frames a
    token takes, at the cost of rounding every stored key and value to bf16; int8 (cpu only) stores
    each key and value row as int8 codes and a float32 scale, 0.27x float32's bytes. weights (default
    $KVOS_WEIGHTS, else "float32"): "gguf" runs a GGUF file's own quantized blocks (cpu only;
    qlinear.py): a quarter of the memory and of the bytes a decode step reads, bf16 GEMMs."""
    parts = lora.split(spec)
    if parts is not None:         # BASE+lora:ADAPTER: the base (shared), then the adapter on it
        base = load_program(parts[0], device, dtype, matmul, kv, weights)
        folder, digest = lora.locate(parts[1])
        with _lock:
            return _cached((base.identity, "lora", digest), _torch_device(device), (),
                           lambda: lora.adapted(base, folder, digest))
    if _too_long(spec):
        raise KvosError(ENOENT, f"no program named {spec[:200]!r}: too long for a file name")
    torch_device = _torch_device(device)
    dtype = _dtype(dtype, torch_device)
    kind = (dtype, _matmul_dtype(matmul, torch_device, dtype), _kv_dtype(kv, torch_device, dtype))
    tp = getattr(device, "tp", None)          # a tensor-parallel rank loads its slice (tp_shard.py)
    if _weights(weights, torch_device) == "gguf":
        if tp is not None:
            raise KvosError(EINVAL, f"{spec}: --weights gguf does not run tensor parallel yet (its quantized "
                                    f"blocks are not sharded); use --weights float32 with --tp")
        kind += ("gguf",)
    with _lock:
        if spec == TINY_NAME and len(kind) == 3:
            return _cached(("tiny", 0), torch_device, kind, lambda: _tiny(torch_device, kind, tp), tp)
        if spec in fetch.MODELS:
            path, digest = fetch.model_file(spec)
            return _gguf(spec, path, digest, torch_device, kind, tp)
        path = Path(spec).expanduser()
        if hub.parse(spec) is not None:          # downloads (or finds in the hub cache) first
            path = hub.resolve(spec)
            return _gguf(spec, path, None, torch_device, kind, tp) if path.is_file() else _hf(spec, path, torch_device,
                                                                                              kind, tp)
        if spec.endswith(".gguf"):
            if not path.is_file():
                raise KvosError(ENOENT, f"{spec}: no such model file")
            return _gguf(spec, path, None, torch_device, kind, tp)
        if hf_folder.is_hf_folder(path) and len(kind) == 3:
            return _hf(spec, path, torch_device, kind, tp)
        if len(kind) == 4 and (spec == TINY_NAME or hf_folder.is_hf_folder(path)):
            raise KvosError(EINVAL, f"{spec}: --weights gguf runs a GGUF file's quantized weights; this model has none")
    raise KvosError(ENOENT, f"no program named {spec!r}; {hub.THREE_WAYS}")


def _cached(key, device: torch.device, kind, build, tp=None) -> LlamaProgram:
    # the CPU layer loop in C or in Python is chosen at build (llama.py layer_loop): part of the key
    full_key = (key, str(device), kind, None if tp is None else tp.key, layer_loop())
    program = _programs.get(full_key)
    if program is None:
        started = time.perf_counter()
        program = build()
        _programs[full_key] = program
        log.info("loaded %s on %s in %.1f s", program.name, device, time.perf_counter() - started)
    return program


def _identity(digest: str, kind) -> bytes:
    """Page-cache name of the weights: the same file in another dtype computes other K/V."""
    dtype, matmul, kv = kind[:3]
    tag = str(dtype) if matmul == dtype else f"{dtype}\0matmul {matmul}"
    if kv != dtype:
        tag += f"\0kv {kv}"
    if len(kind) == 4:
        tag += f"\0weights {kind[3]}"
    return hashlib.sha256(f"kvos-llama\0{digest}\0{tag}".encode()).digest()


def _program(name, config, weights, tokenizer, digest, device, kind, tp=None) -> LlamaProgram:
    dtype, matmul, kv = kind[:3]
    identity = _identity(digest, kind)
    if tp is not None:        # pages computed under another split (another reduction order) never mix
        identity = hashlib.sha256(identity + f"\0tensor parallel {tp.size}".encode()).digest()
    return LlamaProgram(name, config, weights, tokenizer, identity, device, dtype, matmul, kv, tp)


def _tiny(device, kind, tp=None) -> LlamaProgram:
    config, tokenizer = tiny.TINY_CONFIG, tiny.tiny_tokenizer()
    weights = fuse_hf_weights(config, tiny.tiny_weights(config, seed=0))
    digest = tiny.tiny_identity(config, 0, tokenizer)
    return _program(TINY_NAME, config, weights, tokenizer, digest, device, kind, tp)


def _gguf(name: str, path: Path, digest: str | None, device, kind, tp=None) -> LlamaProgram:
    digest = digest or file_digest(path)
    if len(kind) == 4:
        return _gguf_quantized(name, path, digest, device, kind)

    def build():
        cached = converted.load_converted(digest)
        if cached is None:
            log.info("converting %s (the first load of this file parses and dequantizes it, then caches it)",
                     path.name)
            model = gguf_file.read_gguf(path)
            weights = fuse_hf_weights(model.config, model.tensors)
            del model.tensors
            converted.save_converted(digest, model.config, weights, model.tokenizer)
            cached = model.config, weights, model.tokenizer
        config, weights, tokenizer = cached
        return _program(name, config, weights, tokenizer, digest, device, kind, tp)

    return _cached(("file", digest), device, kind, build, tp)


def _gguf_quantized(name: str, path: Path, digest: str, device, kind) -> LlamaProgram:
    """The file's own blocks (gguf_blocks, qlinear), cached repacked in quantized/ (qcache): never float32."""
    def build():
        cached = qcache.load_quantized(digest)
        if cached is None:
            log.info("repacking %s's quantized weights (first load of this file; then cached)", path.name)
            model = gguf_file.read_gguf(path, dequantize=False)
            weights = gguf_blocks.canonical(model.config, model.tensors, model.permuted)
            del model.tensors
            saved = qcache.save_quantized(digest, model.config, weights, model.tokenizer)
            # read back from the cache when it was written: its blocks then sit in huge pages (qcache)
            cached = (saved and qcache.load_quantized(digest)) or (model.config, weights, model.tokenizer)
        config, weights, tokenizer = cached
        return _program(name, config, weights, tokenizer, digest, device, kind)

    return _cached(("file", digest), device, kind, build)


def _hf(name: str, folder: Path, device, kind, tp=None) -> LlamaProgram:
    config = hf_folder.read_config(folder)      # refuse a foreign model before hashing its weights
    digest = hf_folder.folder_digest(folder)

    def build():
        tokenizer = hf_folder.read_tokenizer(folder)
        weights = fuse_hf_weights(config, hf_folder.read_weights(folder))
        return _program(name, config, weights, tokenizer, digest, device, kind, tp)

    return _cached(("file", digest), device, kind, build, tp)


def _torch_device(device) -> torch.device:
    kind = getattr(device, "kind", None)
    if kind is not None and kind not in ("cpu", "cuda"):
        raise KvosError(ENODEV, f"LLaMA programs run on cpu or cuda devices, not {kind!r}")
    if hasattr(device, "torch_device"):
        return device.torch_device
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError):
        raise KvosError(ENODEV, f"no such device {device!r}") from None
    if torch_device.type not in ("cpu", "cuda"):
        raise KvosError(ENODEV, f"LLaMA programs run on cpu or cuda devices, not {torch_device.type!r}")
    return torch_device


def _dtype(dtype, device: torch.device) -> torch.dtype:
    """float32 on the CPU, bfloat16 on CUDA, unless the caller or $KVOS_DTYPE says otherwise."""
    dtype = dtype or os.environ.get("KVOS_DTYPE") or ("float32" if device.type == "cpu" else "bfloat16")
    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    if not (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        raise KvosError(EINVAL, f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device.type == "cpu" and dtype != torch.float32:
        raise KvosError(EINVAL, f"programs on the cpu run in float32 (its kernels are float32), not {dtype}")
    return dtype


def _weights(weights, device: torch.device) -> str:
    """"float32" or "gguf": the caller's, $KVOS_WEIGHTS, or float32."""
    weights = weights or os.environ.get("KVOS_WEIGHTS") or "float32"
    if weights not in WEIGHTS:
        raise KvosError(EINVAL, f"weights {weights!r} is not one of {', '.join(WEIGHTS)}")
    if weights == "gguf" and device.type != "cpu":
        raise KvosError(EINVAL, f"--weights gguf runs on the cpu (its int4 GEMMs are torch's cpu ones), "
                                f"not {device.type}")
    return weights


# The KV cache may also be int8 on the CPU: rows of int8 codes with a float32 scale each (kernel/kvcache.py).
KV_CPU_ONLY = {"int8": torch.int8}


def _kv_dtype(kv, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: the caller's, $KVOS_KV, or the program's dtype; int8 on the cpu too."""
    return _part_dtype(kv, "KVOS_KV", "the KV cache", device, dtype, cpu_only=KV_CPU_ONLY)


def _matmul_dtype(matmul, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The linear layers' dtype: the caller's, $KVOS_MATMUL, or the program's dtype."""
    return _part_dtype(matmul, "KVOS_MATMUL", "the matmuls", device, dtype)


def _part_dtype(value, env: str, part: str, device: torch.device, dtype: torch.dtype, cpu_only=None) -> torch.dtype:
    """A part of the program that may be narrower than its activations: bfloat16 under float32
    on the CPU (the C kernels and AMX convert), or one of cpu_only's dtypes (name -> dtype) that
    only the CPU's kernels store; elsewhere the program's own dtype."""
    cpu_only = cpu_only or {}
    value = value or os.environ.get(env) or dtype
    if isinstance(value, str) and value in cpu_only:
        value = cpu_only[value]
    if value in cpu_only.values():
        if device.type != "cpu":
            raise KvosError(EINVAL, f"{part}: {value} runs on the cpu (its kernels are the C ones), "
                                    f"not {device.type}")
        return value
    if isinstance(value, str) and value in DTYPES:
        value = DTYPES[value]
    if not (isinstance(value, torch.dtype) and value in DTYPES.values()):
        raise KvosError(EINVAL, f"{part}: dtype {value!r} is not one of {', '.join([*DTYPES, *cpu_only])}")
    if device.type == "cpu" and value not in (torch.float32, torch.bfloat16):
        raise KvosError(EINVAL, f"{part} on the cpu can be {' or '.join(['float32', 'bfloat16', *cpu_only])}, "
                                f"not {value}")
    if device.type != "cpu" and value != dtype:
        raise KvosError(EINVAL, f"on {device.type}, {part} must be in the program's dtype ({dtype}), not {value}")
    return value
