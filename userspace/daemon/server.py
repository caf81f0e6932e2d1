"""kvosd: a booted kernel whose loop runs in its own thread, served over HTTP.

Daemon boots the kernel, maps bearer keys to syscall handles (auth.py) and assembles the
FastAPI app (/sys, /v1, /metrics, /health, /tokenize). The port is bound and served first;
load() then starts the configured tenants (their models load: seconds, or a download), while
/health answers 503; everything else waits for it. Shutdown has two halves: begin_drain() at
SIGTERM/SIGINT (refuse new work, kill running processes if asked) while uvicorn lets open
responses finish, then close() (kernel.shutdown: everything freed, fsck) once the server has stopped.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

import kernel
from kernel import State
from kernel.errors import EAGAIN, KvosError
from userspace.daemon import (
    dmesg_log,
    errors,
    lora_api,
    openai_api,
    openapi_doc,
    request_log,
    runs,
    sysapi,
    tokenize_api,
    wire,
)
from userspace.daemon import metrics as metrics_mod
from userspace.daemon.auth import Keys, Principal
from userspace.daemon.config import DaemonConfig
from userspace.daemon.request_limits import RequestLimits

log = logging.getLogger("kvosd")
WORKER_THREADS = 128         # calls into the kernel run here; each holds one for at most a step (waits hold
                             # none), but beam searches, at most openai_beam.BEAM_SEARCHES of them at once


class Daemon:
    def __init__(self, config: DaemonConfig, system=None, collector=None):
        """system: what serves the syscalls -- None boots one kernel from config.boot; or anything
        with a kernel's syscalls(as_tenant) and shutdown(kill, timeout), as a cluster of replicas
        (userspace/cluster), with its /metrics collector."""
        self.config = config
        # Random pids: a tenant must not learn from pid numbers how much the others spawn. The
        # kernel's loop steps in a thread of its own from boot on.
        self.kernel = system if system is not None else kernel.boot(**{"pids": "random", **config.boot, "loop": True})
        self.root = self.kernel.syscalls()
        self.models = {}                                  # tenant name -> model spec (configured tenants)
        self.keys = Keys(config.root_key, self.root)
        self.ready = threading.Event()                    # set once load() has started every tenant
        self.load_error: BaseException | None = None
        self.nonce = secrets.token_hex(4)                 # response ids stay unique across restarts
        self.booted_at = time.time()
        self.draining = False
        self.kill_on_shutdown = config.kill_on_shutdown
        self.metrics = metrics_mod.Metrics(self.root, collector)
        self._reaper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvosd-reaper")
        self.app = build_app(self)

    def load(self) -> None:
        """Start the configured tenants, loading (or downloading) their models, then be ready.
        A failure is kept in load_error (serve() ends with it)."""
        try:
            count = len(self.config.tenants)
            for i, spec in enumerate(self.config.tenants, 1):
                log.info("loading %s for tenant %s (%d of %d)", spec.model, spec.name, i, count)
                started = time.monotonic()
                tid = self.root.spawn_tenant(spec.model, name=spec.name, **spec.options)
                info = self.root.tenantinfo(tid)
                log.info("tenant %s ready in %.1f s: %s, %d tokens of context, %s K/V", spec.name,
                         time.monotonic() - started, info.model, info.max_context, info.kv_dtype)
                self.models[spec.name] = spec.model
                self.keys.add(spec.key, Principal(spec.name, tid, spec.model, self.kernel.syscalls(as_tenant=tid)))
            # The models are loaded: what exists now lives as long as kvosd. Frozen, the collector's full
            # passes no longer walk it (~170k objects of torch and the programs: ~80 ms a pass).
            gc.collect()
            gc.freeze()
            self.ready.set()
        except BaseException as err:        # noqa: BLE001 -- serve() and ServerThread raise it
            self.load_error = err

    # -- requests --------------------------------------------------------------------------------
    def authenticate(self, request: Request) -> Principal:
        if not self.ready.is_set():
            raise KvosError(EAGAIN, "kvosd is still loading its models (GET /health answers 200 once it is ready)")
        return self.keys.authenticate(request)

    def principals(self) -> list:
        """(key, Principal) of every key given at start, root first (the open API's tenant: key None)."""
        return self.keys.principals()

    def refuse_if_draining(self, what: str) -> None:
        if self.draining:
            raise KvosError(EAGAIN, f"{what}: kvosd is shutting down")

    def http_status(self, err: KvosError) -> int:
        if err.errno == EAGAIN and (self.draining or not self.ready.is_set()):
            return 503
        return wire.HTTP_STATUS.get(err.errno, 500)

    def observe_tokens(self, run, choice: int, count: int, now: float, last_token_at: dict) -> None:
        """Histogram samples for `count` tokens of a choice that arrived by `now`."""
        last = last_token_at.get(choice)
        if last is None:
            self.metrics.ttft.labels(run.tenant).observe(now - run.started)
            if run.first_token is None:
                run.first_token = now
        else:
            gap = (now - last) / count
            for _ in range(count):
                self.metrics.tbt.labels(run.tenant).observe(gap)
        last_token_at[choice] = now

    def request_done(self, run, endpoint: str) -> None:
        """An OpenAI request has ended (run.outcome says how): its counters, latency and log line."""
        request_log.finished(self.metrics, run, endpoint)

    def release_later(self, run) -> None:
        """Kill and reap a request's processes off the event loop (callers may be mid-cancellation)."""
        run.finished = True
        try:
            self._reaper.submit(runs.release, run.handle, list(run.pids))
        except RuntimeError:         # the reaper has stopped (close() began): release here
            runs.release(run.handle, list(run.pids))

    # -- shutdown ------------------------------------------------------------------------------------
    def begin_drain(self, kill: bool | None = None) -> None:
        """Refuse new work from now on; with kill, end every running process (their streams finish)."""
        self.draining = True
        if kill is not None:
            self.kill_on_shutdown = kill
        if self.kill_on_shutdown:
            self._reaper.submit(self._kill_all)

    def _kill_all(self) -> None:
        for p in self.root.ps():
            if p.state != State.ZOMBIE.value:
                with contextlib.suppress(KvosError):     # shm builders refuse (EPERM); exited ones are gone
                    self.root.kill(p.pid)

    def close(self) -> dict:
        """Stop the kernel: finish or kill what is left, free everything, fsck. -> a short report.
        Raises KernelPanic if memory is not all back."""
        self.draining = True
        self._reaper.shutdown(wait=True)
        self.kernel.shutdown(kill=self.kill_on_shutdown, timeout=self.config.shutdown_timeout)
        info = self.root.meminfo()
        return {"frames_total": info.total, "frames_free": info.free, "frames_cached": info.cached,
                "frames_mapped": info.mapped, "swap_used": info.swap_used, "fsck": "clean"}


# -- the app --------------------------------------------------------------------------------------------
def build_app(daemon: Daemon) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
        relay = asyncio.create_task(dmesg_log.relay(daemon.root))     # the kernel's warnings into the log
        try:
            yield
        finally:
            relay.cancel()

    app = FastAPI(title="kvosd", version="0.1.0", lifespan=lifespan,
                  description="kvos as a daemon: the syscall table (generated from kernel.syscalls.SYSCALLS) "
                              "under /sys, an OpenAI-compatible API under /v1, Prometheus metrics at /metrics. "
                              "Every route but /health, /healthz and the OpenAPI pages needs "
                              "'Authorization: Bearer KEY', unless kvosd was started open (no key).")

    errors.install(app, daemon)
    app.add_middleware(RequestLimits, max_body_bytes=daemon.config.max_body_bytes,
                       max_header_bytes=daemon.config.max_header_bytes)
    sysapi.add_routes(app, daemon)
    request_models = openai_api.add_routes(app, daemon)
    request_models += tokenize_api.add_routes(app, daemon)
    request_models += lora_api.add_routes(app, daemon)

    async def metrics(request: Request):
        who = daemon.authenticate(request)
        if who.tid is None or who.anonymous:           # root, or anyone when the API is open
            body = await anyio.to_thread.run_sync(daemon.metrics.render)
        else:
            body = await anyio.to_thread.run_sync(daemon.metrics.render, who.handle, who.name)
        return Response(body, media_type=metrics_mod.CONTENT_TYPE)
    app.add_api_route("/metrics", metrics, methods=["GET"], tags=["metrics"],
                      summary="Prometheus metrics (root, or an open API: everything; a tenant key: that "
                              "tenant's series)")

    async def loop_error():
        """None while the kernel loop runs, else why it stopped."""
        loop = await anyio.to_thread.run_sync(daemon.root.loopctl)
        return None if loop.running else (loop.error or "the kernel loop has stopped")

    async def health():
        if not daemon.ready.is_set():
            status = "failed" if daemon.load_error is not None else "loading"
            return JSONResponse({"status": status}, status_code=503)
        error = await loop_error()
        if error is not None or daemon.draining:
            return JSONResponse({"status": "stopped" if error else "draining", "error": error}, status_code=503)
        return Response(status_code=200, media_type="text/plain")
    app.add_api_route("/health", health, methods=["GET"], tags=["metrics"],
                      summary="Readiness, as vLLM's: 200 with an empty body once the models are loaded; 503 "
                              "while they load, while draining, or if the kernel loop died (no key)")

    async def healthz():
        error = await loop_error()
        if error is not None:                          # the kernel loop died (a panic) or has stopped
            return JSONResponse({"status": "stopped", "error": error}, status_code=503)
        status = "draining" if daemon.draining else "ok" if daemon.ready.is_set() else "loading"
        return {"status": status, "pid": os.getpid()}
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["metrics"],
                      summary="Liveness: ok, loading or draining; 503 if the kernel loop died (no key)")

    async def whoami(request: Request):
        who = daemon.authenticate(request)
        return {"name": who.name, "tid": who.tid, "root": who.tid is None, "model": who.model}
    app.add_api_route("/whoami", whoami, methods=["GET"], tags=["syscalls"], summary="What this key is")

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in request_models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            first = next((who for _, who in daemon.principals() if who.tid is not None), None)
            app.openapi_schema = openapi_doc.describe(schema, None if first is None else (first.name, first.tid))
        return app.openapi_schema
    app.openapi = openapi
    return app
