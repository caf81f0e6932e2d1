"""/metrics: the kernel's /proc as Prometheus families, plus what the daemon times itself.

Kernel state (processes, frames, counters) is read through a syscall handle at
each scrape, so it is never stale and never double-kept. Time to first token and
time between tokens are observed by the daemon while it serves OpenAI requests:
what a client of the daemon experiences, queueing included. Root's scrape shows
everything; a tenant's key scrapes its own series only (its processes, frames and
requests), as its syscalls see only itself.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kernel import State
from kernel.errors import KvosError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# schedstat / meminfo counters exported as Prometheus counters: (family, source, field, help)
_COUNTERS = (
    ("kvos_steps", "sched", "steps", "Kernel steps (time slices) run"),
    ("kvos_prefill_tokens", "sched", "prefill_tokens", "Prompt (and recomputed) tokens computed"),
    ("kvos_decode_tokens", "sched", "decode_tokens", "Tokens computed to produce the next token"),
    ("kvos_cached_tokens", "sched", "cached_tokens", "Prompt tokens mapped from the page cache or shm"),
    ("kvos_generated_tokens", "sched", "generated_tokens", "Tokens sampled"),
    ("kvos_draft_tokens", "sched", "draft_tokens", "Tokens computed on speculation (drafts)"),
    ("kvos_accepted_tokens", "sched", "accepted_tokens", "Drafts the draws matched (their K/V kept)"),
    ("kvos_admissions", "sched", "admissions", "Processes admitted to run"),
    ("kvos_preemptions", "sched", "preemptions", "Processes preempted"),
    ("kvos_swap_outs", "sched", "swap_outs", "Processes swapped out to host memory"),
    ("kvos_swap_ins", "sched", "swap_ins", "Processes swapped back in"),
    ("kvos_reclaims", "sched", "reclaims", "Processes whose pages were reclaimed, to be recomputed"),
    ("kvos_recomputed_tokens", "sched", "recomputed_tokens", "Tokens computed again after a reclaim"),
    ("kvos_exits", "sched", "exits", "Processes exited"),
    ("kvos_oom_kills", "sched", "oom_kills", "Processes ended because they could never be admitted"),
    ("kvos_forward_errors", "sched", "forward_errors", "Forward passes that failed"),
    ("kvos_cow_faults", "mem", "cow_faults", "Copy-on-write faults (a shared partial page copied)"),
    ("kvos_page_cache_hits", "mem", "page_cache_hits", "Pages mapped from the page cache"),
    ("kvos_page_cache_evictions", "mem", "page_cache_evictions", "Cached pages evicted for new ones"),
    ("kvos_swapped_out_pages", "mem", "swapped_out_pages", "Pages moved to host swap"),
    ("kvos_swapped_in_pages", "mem", "swapped_in_pages", "Pages moved back from host swap"),
)
_POOL_STATES = ("free", "cached", "mapped", "shared", "pinned")


class KernelCollector:
    """A prometheus_client collector that asks the kernel at each scrape (root: the whole kernel;
    a tenant's handle: that tenant's own families)."""

    def __init__(self, handle, tenant: str | None = None):
        self.root = handle
        self.tenant = tenant

    def collect(self):
        procs, mem, sched = self.root.ps(), self.root.meminfo(), self.root.schedstat()
        tenants = [t.name for t in sched.tenants]
        if self.tenant is not None:
            yield from self._tenant_families(procs, mem, sched)
            return

        by_state = GaugeMetricFamily("kvos_processes", "Processes by tenant and state", labels=["tenant", "state"])
        counts = {(t, s.value): 0 for t in tenants for s in State}
        for p in procs:
            counts[(p.tenant, p.state)] = counts.get((p.tenant, p.state), 0) + 1
        for (tenant, state), n in sorted(counts.items()):
            by_state.add_metric([tenant, state], n)
        yield by_state

        frames = GaugeMetricFamily("kvos_frames", "Frames of the KV pool by state (shared and pinned are "
                                   "subsets of mapped)", labels=["state"])
        for state in _POOL_STATES:
            frames.add_metric([state], getattr(mem, state))
        frames.add_metric(["total"], mem.total)
        yield frames

        per_tenant = GaugeMetricFamily("kvos_tenant_frames", "Frames per tenant: charged to its cgroup; "
                                       "private, shared and swapped pages of its processes",
                                       labels=["tenant", "state"])
        limits = GaugeMetricFamily("kvos_tenant_frame_limit", "A tenant's memory limit in frames",
                                   labels=["tenant"])
        pages = {t: {"private": 0, "shared": 0, "swapped": 0} for t in tenants}
        for p in procs:
            row = pages.setdefault(p.tenant, {"private": 0, "shared": 0, "swapped": 0})
            row["shared"] += p.shared_pages
            row["swapped"] += p.swapped_pages
            row["private"] += p.pages - p.shared_pages - p.swapped_pages
        for tenant in sorted(pages):
            cgroup = mem.cgroups.get(tenant)
            per_tenant.add_metric([tenant, "charged"], cgroup.charged if cgroup else 0)
            for state, n in pages[tenant].items():
                per_tenant.add_metric([tenant, state], n)
            if cgroup is not None and cgroup.limit is not None:
                limits.add_metric([tenant], cgroup.limit)
        yield per_tenant
        yield limits

        swap = GaugeMetricFamily("kvos_swap_slots", "Host swap slots by state", labels=["state"])
        swap.add_metric(["used"], mem.swap_used)
        swap.add_metric(["total"], mem.swap_total)
        yield swap

        for family, source, name, doc in _COUNTERS:
            yield CounterMetricFamily(family, doc, value=getattr(sched if source == "sched" else mem, name))

        yield GaugeMetricFamily("kvos_tokens_per_second", "Tokens computed (prefill + decode) per busy second",
                                value=sched.tokens_per_second)
        yield GaugeMetricFamily("kvos_generated_tokens_per_second", "Tokens sampled per busy second",
                                value=sched.generated_tokens / sched.busy_seconds if sched.busy_seconds else 0.0)
        # Prompt tokens served from the page cache (or shm) over all prompt tokens the kernel needed.
        needed = sched.cached_tokens + sched.prefill_tokens - sched.recomputed_tokens
        yield GaugeMetricFamily("kvos_page_cache_hit_rate", "Prompt tokens mapped from the page cache or shm "
                                "over prompt tokens needed", value=sched.cached_tokens / needed if needed else 0.0)
        yield GaugeMetricFamily("kvos_running", "Processes in the running set", value=sched.running)
        yield GaugeMetricFamily("kvos_waiting", "Processes waiting for admission", value=sched.waiting)
        yield GaugeMetricFamily("kvos_kv_utilization", "Tokens stored over the token capacity of mapped frames",
                                value=mem.utilization)


    def _tenant_families(self, procs, mem, sched):
        """A tenant's view: its processes by state, its frames, its queue lengths, its service."""
        by_state = GaugeMetricFamily("kvos_processes", "Processes by tenant and state", labels=["tenant", "state"])
        for state in State:
            by_state.add_metric([self.tenant, state.value], sum(p.state == state.value for p in procs))
        yield by_state
        per_tenant = GaugeMetricFamily("kvos_tenant_frames", "Frames per tenant: charged to its cgroup; "
                                       "private, shared and swapped pages of its processes",
                                       labels=["tenant", "state"])
        cgroup = mem.cgroups.get(self.tenant)
        per_tenant.add_metric([self.tenant, "charged"], cgroup.charged if cgroup else 0)
        per_tenant.add_metric([self.tenant, "shared"], sum(p.shared_pages for p in procs))
        per_tenant.add_metric([self.tenant, "swapped"], sum(p.swapped_pages for p in procs))
        per_tenant.add_metric([self.tenant, "private"],
                              sum(p.pages - p.shared_pages - p.swapped_pages for p in procs))
        yield per_tenant
        if cgroup is not None and cgroup.limit is not None:
            limits = GaugeMetricFamily("kvos_tenant_frame_limit", "A tenant's memory limit in frames",
                                       labels=["tenant"])
            limits.add_metric([self.tenant], cgroup.limit)
            yield limits
        own = sched.tenants[0] if sched.tenants else None
        yield CounterMetricFamily("kvos_tenant_served_tokens", "Tokens computed for this tenant",
                                  value=own.served_tokens if own else 0)
        yield GaugeMetricFamily("kvos_running", "Processes in the running set", value=sched.running)
        yield GaugeMetricFamily("kvos_waiting", "Processes waiting for admission", value=sched.waiting)


class _OneTenant:
    """The daemon's own histograms and counters, only the samples labelled with one tenant."""

    def __init__(self, metrics, tenant: str):
        self.metrics, self.tenant = metrics, tenant

    def collect(self):
        for metric in self.metrics.daemon_metrics():
            for family in metric.collect():
                family.samples = [s for s in family.samples if s.labels.get("tenant") == self.tenant]
                yield family


class Metrics:
    """One registry per daemon (tests run several daemons in one process)."""

    def __init__(self, root, collector=None):
        """collector(handle, tenant=None): what reads the kernel at each scrape (KernelCollector;
        a cluster's labels each series with its replica)."""
        self.collector = collector or KernelCollector
        self.registry = CollectorRegistry()
        self.registry.register(self.collector(root))
        self.ttft = Histogram("kvos_time_to_first_token_seconds", "From request arrival to the first token, "
                              "per choice (OpenAI API)", ["tenant"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.tbt = Histogram("kvos_time_between_tokens_seconds", "Time between consecutive tokens of a choice "
                             "(OpenAI API)", ["tenant"], buckets=TBT_BUCKETS, registry=self.registry)
        self.requests = Counter("kvos_requests", "OpenAI API requests finished, by tenant, endpoint and outcome",
                                ["tenant", "endpoint", "outcome"], registry=self.registry)
        self.latency = Histogram("kvos_request_duration_seconds", "From request arrival to its last token, end to "
                                 "end (OpenAI API; not requests whose client left)", ["tenant", "endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.finish_reasons = Counter("kvos_finish_reasons", "Choices of finished OpenAI requests by finish reason: "
                                      "stop, length, killed, error, or disconnected (the client left)",
                                      ["tenant", "endpoint", "finish_reason"], registry=self.registry)

    def daemon_metrics(self) -> tuple:
        """What the daemon measures itself (labelled by tenant), as opposed to the kernel's state."""
        return self.ttft, self.tbt, self.requests, self.latency, self.finish_reasons

    def render(self, handle=None, tenant: str | None = None) -> bytes:
        """Root's exposition; with a tenant's handle and name, that tenant's series only."""
        registry = self.registry
        if tenant is not None:
            registry = CollectorRegistry()
            registry.register(self.collector(handle, tenant))
            registry.register(_OneTenant(self, tenant))
        try:
            return generate_latest(registry)
        except KvosError:            # the kernel is gone (shutdown finished): nothing left to report
            return b""
