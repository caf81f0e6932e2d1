"""Memory cgroups: per-tenant frame accounting and limits.

A frame is charged to the cgroup of whoever mapped it first (its 0 -> 1
reference), and uncharged when its last reference goes. A frame shared across
tenants (opt-in global prefix sharing) stays charged to that first mapper, as
Linux's memcg does; when a cgroup is removed, frames other tenants still map
move to the root cgroup (reparenting).
"""
from dataclasses import dataclass


@dataclass
class MemCgroup:
    cgid: int
    name: str
    limit: int | None = None    # frames; None means only the pool bounds it
    charged: int = 0            # frames currently charged here (frame table owns this count)

    def room(self) -> int | None:
        """Frames that may still be charged, or None when unlimited."""
        return None if self.limit is None else self.limit - self.charged


ROOT_CGID = 0
