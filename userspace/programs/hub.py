"""Models named by Hugging Face hub id: ORG/NAME[@REVISION][:FILE.gguf], through huggingface_hub.

resolve(spec) gives the local folder (safetensors repos) or file (a GGUF in a repo) from the hub
cache ($HF_HUB_CACHE; $HF_HUB_OFFLINE=1 never asks the network), downloading what is missing
when the hub answers, with huggingface_hub's own progress bars. Answers are remembered for the
process, so the shell can download before it boots a kernel and the loader finds it at once.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import EINVAL, ENOENT, EPERM, KvosError

log = logging.getLogger("kvos.programs")

# ORG/NAME, then @REVISION (a branch, tag or commit), then :FILE.gguf (a file in the repository).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s:@]+))?(?::(?P<file>\S+\.gguf))?")
# What a safetensors model needs; the rest of a repository (other formats, ONNX, images) stays there.
MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"]
THREE_WAYS = ("give a model as a name (smollm2-135m, tiny-llama), a path (a .gguf file or a Hugging Face "
              "folder) or a hub id (ORG/NAME[@REVISION], ORG/NAME:FILE.gguf)")

_resolved: dict = {}                 # spec -> local path, for this process
_lock = threading.Lock()


@dataclass(frozen=True)
class HubId:
    repo: str
    revision: str | None
    file: str | None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.file}" if self.file else "")


def parse(spec: str) -> HubId | None:
    """The hub id spec names, or None when it is not one. A path that exists is never a hub id, and
    neither is a bare .gguf name (a file path)."""
    if not isinstance(spec, str) or spec.startswith((".", "/", "~")) or Path(spec).exists():
        return None
    m = HUB_ID.fullmatch(spec)
    if m is None or (m["file"] is None and spec.endswith(".gguf")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(m["repo"])
    except HFValidationError:
        return None
    return HubId(m["repo"], m["revision"], m["file"])


def with_gguf_file(spec: str, gguf_file: str | None) -> str:
    """--model ORG/NAME --gguf-file FILE.gguf as one spec, ORG/NAME:FILE.gguf."""
    if not gguf_file:
        return spec
    hub_id = parse(spec)
    if hub_id is None or hub_id.file:
        raise KvosError(EINVAL, f"--gguf-file names a file in a hub repository: give --model ORG/NAME, not {spec!r}")
    if not gguf_file.endswith(".gguf"):
        raise KvosError(EINVAL, f"--gguf-file must name a .gguf file, got {gguf_file!r}")
    return f"{spec}:{gguf_file}"


def cache_dir() -> Path:
    """The hub cache, read from the environment at each call (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in constants.ENV_VARS_TRUE_VALUES


def resolve(spec: str) -> Path:
    """The local path of a hub model: its snapshot folder, or its GGUF file. Downloads what the cache
    lacks when the hub is reachable; ENOENT in one line when it is not and the cache has nothing."""
    hub_id = parse(spec)
    if hub_id is None:
        raise KvosError(EINVAL, f"{spec!r} is not a hub id; {THREE_WAYS}")
    with _lock:
        if spec in _resolved and _resolved[spec].exists():
            return _resolved[spec]
        path = _fetch(hub_id)
        _resolved[spec] = path
        return path


def _fetch(hub_id: HubId) -> Path:
    from huggingface_hub import errors, hf_hub_download, snapshot_download
    where, local_only = cache_dir(), offline()
    log.info("%s: %s", hub_id, "looking in the hub cache (HF_HUB_OFFLINE)" if local_only
             else "checking the hub (downloading what the cache lacks)")
    try:
        if hub_id.file:
            path = Path(hf_hub_download(hub_id.repo, hub_id.file, revision=hub_id.revision, cache_dir=where,
                                        local_files_only=local_only))
        else:
            path = Path(snapshot_download(hub_id.repo, revision=hub_id.revision, cache_dir=where,
                                          local_files_only=local_only, allow_patterns=MODEL_FILES,
                                          ignore_patterns=["*/*"]))
    except errors.GatedRepoError:
        raise KvosError(EPERM, f"{hub_id.repo} is gated on the hub: accept its terms on its page and log in "
                                f"(`hf auth login`, or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise KvosError(ENOENT, f"{hub_id.repo}: no such repository on the hub (or it is private: log in "
                                f"with `hf auth login`, or set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise KvosError(ENOENT, f"{hub_id.repo} has no revision {hub_id.revision!r}") from None
    except errors.LocalEntryNotFoundError:             # offline, or the hub did not answer, and not cached
        why = "HF_HUB_OFFLINE is set" if local_only else "the hub cannot be reached"
        raise KvosError(ENOENT, f"{hub_id} is not in the hub cache ({where}) and {why}; {THREE_WAYS}, "
                                f"or download it where the hub is reachable (`kvos pull {hub_id}`)") from None
    except errors.EntryNotFoundError:                   # the remote file does not exist
        raise KvosError(ENOENT, f"{hub_id.repo} has no file {hub_id.file!r}") from None
    except getattr(errors, "IncompleteSnapshotError", ()) as err:     # huggingface_hub 1.x has no such check
        raise KvosError(ENOENT, f"{hub_id}: {err}") from None
    if not hub_id.file and not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf")) or _remote_ggufs(hub_id, local_only)
        hint = (f"it holds GGUF files: name one, {hub_id.repo}:{ggufs[0]} or --gguf-file {ggufs[0]}"
                f"{' (also: ' + ', '.join(ggufs[1:4]) + ')' if len(ggufs) > 1 else ''}" if ggufs
                else "only Hugging Face folders (config.json, *.safetensors) and GGUF files load")
        raise KvosError(ENOENT, f"{hub_id}: no config.json in the repository; {hint}")
    log.info("%s: %s", hub_id, path)
    return path


def _remote_ggufs(hub_id: HubId, local_only: bool) -> list:
    """The .gguf files of a repository, asked of the hub (nothing when offline or unreachable)."""
    if local_only:
        return []
    from huggingface_hub import HfApi
    try:
        return sorted(f for f in HfApi().list_repo_files(hub_id.repo, revision=hub_id.revision)
                      if f.endswith(".gguf") and "/" not in f)
    except Exception:                                   # noqa: BLE001 -- only a hint
        return []
