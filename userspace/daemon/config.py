"""kvosd's configuration: how to boot the kernel, which tenants to start, and their keys.

A tenants file (JSON or TOML) names a root key and a list of tenants, each with a
model, a bearer key and the limits spawn_tenant() takes (docs/daemon.md shows one).
Without a file the daemon runs one tenant of --model, keyed by --api-key or
$KVOS_API_KEY, or open (no key: as `vllm serve` without --api-key). Keys a tenants
file leaves out are generated and shown once on stderr.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from kernel.errors import EINVAL, ENOENT, KvosError

try:
    import tomllib
except ModuleNotFoundError:          # Python 3.10: JSON tenants files only
    tomllib = None

# Tenant names: they appear in URLs, metrics labels and logs, and "root" names the root key's principal.
TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
RESERVED_NAMES = frozenset({"root"})

# spawn_tenant() keyword arguments a tenants file may set.
TENANT_OPTIONS = ("mem_limit", "weight", "prefix_sharing", "max_procs", "max_queued", "nice_min",
                  "max_prompt_tokens", "max_new_tokens")


@dataclass
class TenantSpec:
    name: str
    model: str
    key: str | None                                    # None: the open API's tenant (no key needed)
    options: dict = field(default_factory=dict)       # spawn_tenant() keywords


@dataclass
class DaemonConfig:
    boot: dict                                         # kernel.boot() keywords
    tenants: list                                      # [TenantSpec]
    root_key: str
    kill_on_shutdown: bool = False
    shutdown_timeout: float | None = None              # then processes still running are killed
    generated_keys: dict = field(default_factory=dict)  # who -> key made up here (to show once)
    # The HTTP server's limits (docs/daemon.md, "Limits"): what one client can make the daemon hold.
    max_body_bytes: int = 4 * 1024 * 1024              # a request body; more is 413 E2BIG, unread
    max_header_bytes: int = 16 * 1024                  # the request line and headers; more is 400
    header_timeout: float = 10.0                       # seconds to send a whole request head
    keep_alive_timeout: float = 30.0                   # an idle connection between requests
    max_connections: int = 4096                        # open at once; more are answered 503 EAGAIN
    ssl_keyfile: str | None = None                     # TLS: both, or neither
    ssl_certfile: str | None = None
    allow_open: bool = False                           # an open API (no key) beyond loopback: said explicitly

    @property
    def open_api(self) -> bool:
        """Whether requests without a key are served (as the one tenant that has none)."""
        return any(t.key is None for t in self.tenants)


def new_key() -> str:
    return "kvos-" + secrets.token_urlsafe(24)


def _key(entry: dict, what: str, generated: dict, env_default: str | None = None) -> str:
    """A key from `key`, from the variable named by `key_env`, from env_default, or made up."""
    if "key" in entry and "key_env" in entry:
        raise KvosError(EINVAL, f"{what}: give key or key_env, not both")
    if "key" in entry:
        key = entry["key"]
    elif "key_env" in entry:
        key = os.environ.get(str(entry["key_env"]))
        if not key:
            raise KvosError(EINVAL, f"{what}: the environment variable {entry['key_env']!r} is not set")
    elif env_default and os.environ.get(env_default):
        key = os.environ[env_default]
    else:
        key = generated[what] = new_key()
    if not isinstance(key, str) or len(key) < 8 or any(c.isspace() for c in key):
        raise KvosError(EINVAL, f"{what}: a key must be a string of at least 8 characters without spaces")
    return key


def check_name(name, what: str) -> str:
    """A tenant name: 1 to 64 of [A-Za-z0-9._-], and not a reserved name."""
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
        raise KvosError(EINVAL, f"{what}: a tenant name is 1 to 64 characters of A-Z a-z 0-9 . _ -, "
                                f"got {name!r}")
    if name.lower() in RESERVED_NAMES:
        raise KvosError(EINVAL, f"{what}: the tenant name {name!r} is reserved (the root key's)")
    return name


def name_from_model(model: str) -> str:
    """A tenant name for a tenant named after its model: the model's name, or its file's stem
    with other characters made '-' when the model is a path."""
    if TENANT_NAME.fullmatch(model) and model.lower() not in RESERVED_NAMES:
        return model
    stem = Path(model.rstrip("/\\")).name
    stem = stem.removesuffix(".gguf") or "model"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem)[:64]
    return name if name.lower() not in RESERVED_NAMES else f"{name}-model"


def read_tenants_file(path) -> dict:
    """The parsed file: TOML when it ends in .toml, else JSON."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise KvosError(ENOENT, f"tenants file {str(path)!r}: {err.strerror}") from None
    if path.suffix == ".toml" and tomllib is None:
        raise KvosError(EINVAL, f"tenants file {str(path)!r}: TOML needs Python 3.11; use JSON")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, json.JSONDecodeError) as err:
        raise KvosError(EINVAL, f"tenants file {str(path)!r} does not parse: {err}") from None
    if not isinstance(data, dict):
        raise KvosError(EINVAL, f"tenants file {str(path)!r}: the top level must be a table/object")
    return data


def tenant_specs(data: dict, generated: dict) -> tuple[list, str]:
    """(tenants, root key) from a parsed tenants file."""
    unknown = set(data) - {"root_key", "root_key_env", "tenants"}
    if unknown:
        raise KvosError(EINVAL, f"tenants file: unknown key {sorted(unknown)[0]!r} "
                                f"(known: root_key, root_key_env, tenants)")
    root = {k[5:]: v for k, v in data.items() if k in ("root_key", "root_key_env")}
    root_key = _key(root, "root", generated, "KVOS_ROOT_KEY")
    entries = data.get("tenants")
    if not isinstance(entries, list) or not entries:
        raise KvosError(EINVAL, "tenants file: 'tenants' must be a non-empty list")
    specs, keys = [], {root_key: "root"}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise KvosError(EINVAL, f"tenants[{i}] must be a table/object")
        known = {"name", "model", "key", "key_env", *TENANT_OPTIONS}
        extra = sorted(set(entry) - known)
        if extra:
            raise KvosError(EINVAL, f"tenants[{i}]: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")
        if not isinstance(entry.get("model"), str) or not entry["model"]:
            raise KvosError(EINVAL, f"tenants[{i}]: 'model' (a model name or path) is required")
        name = check_name(entry["name"], f"tenants[{i}]") if "name" in entry else name_from_model(entry["model"])
        if any(s.name == name for s in specs):
            raise KvosError(EINVAL, f"tenants[{i}]: a tenant named {name!r} is already listed")
        key = _key(entry, name, generated)
        if key in keys:
            raise KvosError(EINVAL, f"tenant {name!r} has the same key as {keys[key]!r}")
        keys[key] = name
        specs.append(TenantSpec(name, entry["model"], key, {k: entry[k] for k in TENANT_OPTIONS if k in entry}))
    return specs, root_key


def default_specs(model: str, generated: dict, api_key: str | None = None) -> tuple[list, str]:
    """No tenants file: one tenant of `model`, named after it, keyed by api_key (--api-key), else
    $KVOS_API_KEY, else none: the API is open (the daemon refuses that beyond loopback unless told)."""
    root_key = _key({}, "root", generated, "KVOS_ROOT_KEY")
    name = name_from_model(model)
    key = api_key or os.environ.get("KVOS_API_KEY") or None
    if key is not None:
        key = _key({"key": key}, name, generated)
        if key == root_key:
            raise KvosError(EINVAL, "the API key and the root key (KVOS_ROOT_KEY) must differ")
    return [TenantSpec(name, model, key)], root_key
