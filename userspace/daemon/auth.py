"""Who a request is: bearer keys to principals, and the open API.

A key is root's or one tenant's; each principal acts through its own syscall handle. A
single-tenant kvosd started without a key (no --api-key, no $KVOS_API_KEY, no tenants file)
is open, as `vllm serve` is without --api-key: a request with no known key acts as that tenant
(a known key still counts, so local clients keep root). Open is refused beyond loopback unless
the operator says --allow-open.
"""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, replace

from fastapi import Request

from kernel.errors import EINVAL, KvosError
from userspace.daemon.errors import Unauthorized


@dataclass
class Principal:
    """Who a bearer key is: root (tid None) or one tenant, and the syscall handle it acts through."""
    name: str
    tid: int | None
    model: str | None
    handle: object
    anonymous: bool = False          # no key: the open API's caller


class Keys:
    """The keys given at start, root first; tenants' keys are added as their models load."""

    def __init__(self, root_key: str, root_handle):
        self._keys = [(root_key.encode(), Principal("root", None, None, root_handle))]
        self.open_as: Principal | None = None      # the tenant a request without a known key acts as

    def add(self, key: str | None, who: Principal) -> None:
        if key is None:
            self.open_as = replace(who, anonymous=True)
        else:
            self._keys.append((key.encode(), who))

    def principals(self) -> list:
        """(key, Principal) of every key, root first (the open API's tenant with key None)."""
        return [(known.decode(), who) for known, who in self._keys] + ([(None, self.open_as)] if self.open_as else [])

    def authenticate(self, request: Request) -> Principal:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else ""
        found = None
        if key:
            for known, who in self._keys:        # compare with every key: the time says nothing of which
                if hmac.compare_digest(known, key.encode()):
                    found = who
        if found is None and self.open_as is not None:
            found = self.open_as
        if found is None:
            raise Unauthorized("unknown bearer key" if key else "no bearer key: send 'Authorization: Bearer KEY'")
        if not found.handle.alive:            # keys die with their tenant (kill_tenant)
            raise Unauthorized(f"the tenant of this key ({found.name!r}) no longer exists")
        return found


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:                  # a host name: assume it is reachable
        return False


def check_exposure(host: str, config) -> None:
    """Refuse an open API (no key) on an address other machines reach, unless config.allow_open."""
    if config.open_api and not is_loopback(host) and not config.allow_open:
        raise KvosError(EINVAL, f"serving {host} with no API key would let anyone who reaches it use the model: "
                                f"give --api-key KEY (or $KVOS_API_KEY), a --tenants file with keys, or "
                                f"--allow-open to serve it open on purpose")
