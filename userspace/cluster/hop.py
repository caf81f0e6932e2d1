"""What the gateway's hops cost per request: the same calls through four doors, in one run.

    python -m userspace.cluster.hop [--rounds 5] [--requests 20]

Doors: an in-process kernel handle; kvosd (one kernel) over HTTP; a ClusterHandle in this
process (the Ray hop to a replica actor); the gateway over HTTP (HTTP, then Ray). Each door
serves the same tiny-llama, one replica or kernel each, booted alike. Two calls: tenantinfo (no
kernel step: the bare round trip) and spawn + wait of one greedy token (a request: the
kernel's loop runs a step). Doors take turns, round after round (so the noise of a shared
machine falls on all of them); medians in milliseconds, and each door's extra over in-process.
"""
from __future__ import annotations

import argparse
import statistics
import time

import kernel
from userspace.cluster.cluster import Cluster
from userspace.cluster.gateway import GatewayThread
from userspace.daemon.client import Client
from userspace.daemon.config import DaemonConfig, TenantSpec
from userspace.daemon.listen import ServerThread

BOOT = dict(device="cpu", memory="8MiB", swap="4MiB", threads=1)
PROMPT = [1, 57, 120, 33, 250, 91, 400]


def calls(handle, tid):
    return {"tenantinfo": lambda: handle.tenantinfo(tid),
            "spawn+wait 1 token": lambda: handle.wait(handle.spawn(tid, PROMPT, max_tokens=1, temperature=0))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20, help="per door, call and round")
    args = ap.parse_args(argv)
    config = DaemonConfig(boot=BOOT, tenants=[TenantSpec("t", "tiny-llama", "key-t")], root_key="root-hop")
    k = kernel.boot(**{**BOOT, "loop": True})
    local = k.syscalls()
    ltid = local.spawn_tenant("tiny-llama")
    kvosd = ServerThread(config)
    cluster = Cluster(1, BOOT)
    gateway = GatewayThread(config, cluster)
    try:
        ctid = cluster.syscalls().schedstat().tenants[0].tid
        doors = {"in-process handle": calls(local, ltid),
                 "kvosd over HTTP": calls(Client(kvosd.url, "root-hop"), ltid),
                 "cluster handle (Ray)": calls(cluster.syscalls(), ctid),
                 "gateway over HTTP + Ray": calls(Client(gateway.url, "root-hop"), ctid)}
        times = {(door, call): [] for door in doors for call in doors[door]}
        for door in doors.values():                     # warm every path once
            for fn in door.values():
                fn()
        for _ in range(args.rounds):
            for door, fns in doors.items():
                for call, fn in fns.items():
                    for _ in range(args.requests):
                        t = time.perf_counter()
                        fn()
                        times[(door, call)].append(time.perf_counter() - t)
        for call in ("tenantinfo", "spawn+wait 1 token"):
            base = statistics.median(times[("in-process handle", call)])
            print(f"\n{call} ({args.rounds} rounds x {args.requests}, doors interleaved):")
            print(f"  {'door':26s} {'median ms':>10s} {'p90 ms':>8s} {'extra ms':>9s}")
            for door in doors:
                xs = sorted(times[(door, call)])
                med = statistics.median(xs)
                print(f"  {door:26s} {med * 1e3:10.3f} {xs[int(0.9 * len(xs))] * 1e3:8.3f} "
                      f"{(med - base) * 1e3:9.3f}")
    finally:
        gateway.stop()
        cluster.close()
        kvosd.stop()
        k.shutdown()


if __name__ == "__main__":
    main()
