"""kvosd: a booted kernel whose loop runs in its own thread, served over HTTP.

Daemon boots the kernel, starts the configured tenants, maps bearer keys to
syscall handles and assembles the FastAPI app (/sys, /v1, /metrics). Shutdown
has two halves: begin_drain() at SIGTERM/SIGINT (refuse new work, kill running
processes if asked) while uvicorn lets open responses finish, then close()
(kernel.shutdown: everything freed, fsck) once the server has stopped.
"""
from __future__ import annotations

import contextlib
import gc
import hmac
import ipaddress
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anyio.to_thread
import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

import kernel
from kernel import State
from kernel.errors import EAGAIN, EINVAL, ENOENT, KernelPanic, KvosError
from userspace.daemon import errors, openai_api, openapi_doc, protocol, runtime, sysapi, wire
from userspace.daemon import metrics as metrics_mod
from userspace.daemon.config import DaemonConfig
from userspace.daemon.errors import Unauthorized
from userspace.daemon.request_limits import RequestLimits

log = logging.getLogger("uvicorn.error")      # kvosd's log is uvicorn's (configured by uvicorn.Config)
WORKER_THREADS = 128         # calls into the kernel run here; each holds one for at most a step (waits hold none)


@dataclass
class Principal:
    """Who a bearer key is: root (tid None) or one tenant, and the syscall handle it acts through."""
    name: str
    tid: int | None
    model: str | None
    handle: object


class Daemon:
    def __init__(self, config: DaemonConfig):
        self.config = config
        # Random pids: a tenant must not learn from pid numbers how much the others spawn. The
        # kernel's loop steps in a thread of its own from boot on.
        self.kernel = kernel.boot(**{"pids": "random", **config.boot, "loop": True})
        self.root = self.kernel.syscalls()
        self.models = {}                                  # tenant name -> model spec (configured tenants)
        self._keys = [(config.root_key.encode(), Principal("root", None, None, self.root))]
        for spec in config.tenants:
            tid = self.root.spawn_tenant(spec.model, name=spec.name, **spec.options)
            self.models[spec.name] = spec.model
            self._keys.append((spec.key.encode(), Principal(spec.name, tid, spec.model,
                                                            self.kernel.syscalls(as_tenant=tid))))
        # The models are loaded: what exists now lives as long as kvosd. Frozen, the collector's full
        # passes no longer walk it (~170k objects of torch and the programs: ~80 ms a pass).
        gc.collect()
        gc.freeze()
        self.nonce = secrets.token_hex(4)                 # response ids stay unique across restarts
        self.booted_at = time.time()
        self.draining = False
        self.kill_on_shutdown = config.kill_on_shutdown
        self.metrics = metrics_mod.Metrics(self.root)
        self._reaper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvosd-reaper")
        self.app = build_app(self)

    # -- requests --------------------------------------------------------------------------------
    def authenticate(self, request: Request) -> Principal:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("no bearer key: send 'Authorization: Bearer KEY'")
        found = None
        for known, who in self._keys:            # compare with every key: the time says nothing of which
            if hmac.compare_digest(known, key.strip().encode()):
                found = who
        if found is None:
            raise Unauthorized("unknown bearer key")
        if not found.handle.alive:            # keys die with their tenant (kill_tenant)
            raise Unauthorized(f"the tenant of this key ({found.name!r}) no longer exists")
        return found

    def principals(self) -> list:
        """(key, Principal) of every key given at start, root first."""
        return list(self._keys)

    def refuse_if_draining(self, what: str) -> None:
        if self.draining:
            raise KvosError(EAGAIN, f"{what}: kvosd is shutting down")

    def http_status(self, err: KvosError) -> int:
        if err.errno == EAGAIN and self.draining:
            return 503
        return wire.HTTP_STATUS.get(err.errno, 500)

    def observe_tokens(self, run, choice: int, count: int, now: float, last_token_at: dict) -> None:
        """Histogram samples for `count` tokens of a choice that arrived by `now`."""
        last = last_token_at.get(choice)
        if last is None:
            self.metrics.ttft.labels(run.tenant).observe(now - run.started)
        else:
            gap = (now - last) / count
            for _ in range(count):
                self.metrics.tbt.labels(run.tenant).observe(gap)
        last_token_at[choice] = now

    def release_later(self, run) -> None:
        """Kill and reap a request's processes off the event loop (callers may be mid-cancellation)."""
        run.finished = True
        try:
            self._reaper.submit(openai_api.release, run.handle, list(run.pids))
        except RuntimeError:         # the reaper has stopped (close() began): release here
            openai_api.release(run.handle, list(run.pids))

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
        yield

    app = FastAPI(title="kvosd", version="0.1.0", lifespan=lifespan,
                  description="kvos as a daemon: the syscall table (generated from kernel.syscalls.SYSCALLS) "
                              "under /sys, an OpenAI-compatible API under /v1, Prometheus metrics at /metrics. "
                              "Every route but /healthz needs 'Authorization: Bearer KEY'.")

    errors.install(app, daemon)
    app.add_middleware(RequestLimits, max_body_bytes=daemon.config.max_body_bytes,
                       max_header_bytes=daemon.config.max_header_bytes)
    sysapi.add_routes(app, daemon)
    request_models = openai_api.add_routes(app, daemon)

    async def metrics(request: Request):
        who = daemon.authenticate(request)
        if who.tid is None:
            body = await anyio.to_thread.run_sync(daemon.metrics.render)
        else:
            body = await anyio.to_thread.run_sync(daemon.metrics.render, who.handle, who.name)
        return Response(body, media_type=metrics_mod.CONTENT_TYPE)
    app.add_api_route("/metrics", metrics, methods=["GET"], tags=["metrics"],
                      summary="Prometheus metrics (root: everything; a tenant key: that tenant's series)")

    async def healthz():
        loop = await anyio.to_thread.run_sync(daemon.root.loopctl)
        if not loop.running:                           # the kernel loop died (a panic) or has stopped
            return JSONResponse({"status": "stopped", "error": loop.error}, status_code=503)
        return {"status": "draining" if daemon.draining else "ok", "pid": os.getpid()}
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["metrics"], summary="Liveness (no key)")

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


# -- running it -------------------------------------------------------------------------------------------
class KvosdServer(uvicorn.Server):
    """uvicorn, told about kvosd's shutdown: the first signal starts draining the kernel, and the
    signal is not raised again once the server stops (kvosd exits 0 after a clean shutdown)."""

    def __init__(self, config: uvicorn.Config, daemon: Daemon):
        super().__init__(config)
        self.daemon = daemon

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self.daemon.begin_drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), bound before uvicorn starts so callers know the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(daemon: Daemon, sock: socket.socket, log_level="info", access_log=True) -> KvosdServer:
    config = daemon.config
    timeout = config.shutdown_timeout
    return KvosdServer(uvicorn.Config(
        daemon.app, log_level=log_level, access_log=access_log, lifespan="on", ws="none",
        http=protocol.protocol_class(config.header_timeout, config.max_connections),
        timeout_keep_alive=config.keep_alive_timeout, h11_max_incomplete_event_size=config.max_header_bytes,
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
        timeout_graceful_shutdown=None if timeout is None else int(timeout) + 1), daemon)


def url_of(sock: socket.socket, tls: bool = False) -> str:
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def local_url(url: str) -> str:
    """The URL a client on this machine uses: a wildcard address (0.0.0.0, ::) is not one to connect to."""
    return url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")


def check_tls(config: DaemonConfig) -> bool:
    """Whether TLS is on; a key without a certificate, or files that do not load, are refused here,
    before a model is loaded (uvicorn would fail later, with a traceback)."""
    if config.ssl_keyfile and not config.ssl_certfile:
        raise KvosError(EINVAL, "--ssl-keyfile needs --ssl-certfile")
    if not config.ssl_certfile:
        return False
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.ssl_certfile,
                                                                            config.ssl_keyfile)
    except FileNotFoundError as err:
        raise KvosError(ENOENT, f"TLS: {err.filename}: no such file") from None
    except (ssl.SSLError, OSError) as err:
        raise KvosError(EINVAL, f"TLS: the certificate or key does not load: {err}") from None
    return True


def exposure_warning(host: str, port: int) -> str | None:
    """The banner for a daemon reachable from other machines without TLS, or None."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:                  # a host name: assume it is reachable
        loopback = False
    if loopback:
        return None
    lines = [f"kvosd is listening on {host}:{port}, beyond this machine, WITHOUT TLS.",
             "Bearer keys (the root key too), prompts and replies cross the network in clear text,",
             "readable and replayable by anyone on the path. Serve on 127.0.0.1, or give",
             "--ssl-keyfile and --ssl-certfile, or put a TLS-terminating proxy in front."]
    bar = "kvosd: WARNING " + "=" * 78
    return "\n".join([bar, *(f"kvosd: WARNING   {line}" for line in lines), bar])


def _room_for_connections(connections: int) -> None:
    """Raise the soft open-file limit (up to the hard one) so max_connections sockets fit beside
    the files kvosd itself holds; say so when the hard limit is lower."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            print(f"kvosd: the open-file limit ({hard}) allows about {new - 256} connections, not "
                  f"--max-connections {connections}", file=sys.stderr)


def serve(config: DaemonConfig, host="127.0.0.1", port=8000, log_level="info") -> int:
    """Run kvosd in the foreground until SIGTERM or SIGINT. -> exit status (0: clean shutdown)."""
    tls = check_tls(config)
    _room_for_connections(config.max_connections)
    sock = bind(host, port)            # first: a taken port fails before a model is loaded
    try:
        daemon = Daemon(config)
    except BaseException:
        sock.close()
        raise
    url = url_of(sock, tls)
    note = runtime.claim(sock.getsockname()[1], local_url(url), config.root_key)
    for who, key in config.generated_keys.items():
        print(f"kvosd: {who} key: {key}", file=sys.stderr)
    server = make_server(daemon, sock, log_level)       # configures uvicorn's loggers
    warning = None if tls else exposure_warning(host, sock.getsockname()[1])
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
        log.warning("kvosd: serving %s without TLS on a non-loopback address", url)
    print(f"kvosd: serving {', '.join(daemon.models) or 'no tenant'} at {url} (OpenAI API at {url}/v1, "
          f"docs at {url}/docs)", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        runtime.release(note)
    try:
        report = daemon.close()
    except KernelPanic as err:
        print(f"kvosd: shutdown found a broken kernel: {err}", file=sys.stderr)
        return 1
    print(f"kvosd: stopped; fsck clean, {report['frames_free'] + report['frames_cached']} of "
          f"{report['frames_total']} frames back", file=sys.stderr, flush=True)
    return 0


class ServerThread:
    """kvosd in a thread of this process, on a free loopback port: for tests and embedding.

        with ServerThread(config) as srv:  ... srv.url ... srv.daemon.kernel ...
    stop() drains and closes like a SIGTERM would and returns close()'s report. With
    runtime_file=True it writes (and at stop() removes) the runtime file, as `kvos serve` does."""

    def __init__(self, config: DaemonConfig, host="127.0.0.1", port=0, runtime_file=False):
        tls = check_tls(config)
        self.sock = bind(host, port)
        try:
            self.daemon = Daemon(config)
        except BaseException:
            self.sock.close()
            raise
        self.url = url_of(self.sock, tls)
        # runtime_file: leave the file `kvos serve` leaves, so local clients find this daemon
        self.note = runtime.claim(self.sock.getsockname()[1], self.url, config.root_key) if runtime_file else None
        self.server = make_server(self.daemon, self.sock, log_level="warning", access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="kvosd", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("kvosd did not start")
            time.sleep(0.01)

    def stop(self, kill: bool | None = None) -> dict:
        self.daemon.begin_drain(kill)
        self.server.should_exit = True
        self.thread.join()
        runtime.release(self.note)
        return self.daemon.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.thread.is_alive():
            self.stop()
