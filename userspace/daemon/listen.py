"""Running kvosd: the listening socket, uvicorn told about the drain, TLS and exposure checks,
`serve` (the foreground process `kvos serve` runs) and ServerThread (kvosd in a thread, for tests
and embedding). The daemon itself (the kernel, keys and the FastAPI app) is server.py's Daemon.

Order that callers rely on: the port is bound before the models load, so a taken port fails first
and /health answers 503 while they load.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import socket
import ssl
import threading
import time

import uvicorn

from kernel.errors import EINVAL, ENOENT, KernelPanic, KvosError
from userspace.daemon import protocol, runtime
from userspace.daemon.auth import check_exposure, is_loopback
from userspace.daemon.config import DaemonConfig
from userspace.daemon.server import Daemon

log = logging.getLogger("kvosd")


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
    """uvicorn for this daemon; logging is left as the caller set it (logs.configure: kvosd's handler)."""
    config = daemon.config
    timeout = config.shutdown_timeout
    return KvosdServer(uvicorn.Config(
        daemon.app, log_level=log_level, access_log=access_log, lifespan="on", ws="none", log_config=None,
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
    """The banner (lines) for a daemon reachable from other machines without TLS, or None."""
    if is_loopback(host):
        return None
    bar = "=" * 78
    return "\n".join([bar, f"  kvosd is listening on {host}:{port}, beyond this machine, WITHOUT TLS.",
                      "  Bearer keys (the root key too), prompts and replies cross the network in clear text,",
                      "  readable and replayable by anyone on the path. Serve on 127.0.0.1, or give",
                      "  --ssl-keyfile and --ssl-certfile, or put a TLS-terminating proxy in front.", bar])


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
            log.warning("the open-file limit (%d) allows about %d connections, not --max-connections %d",
                        hard, new - 256, connections)


def _announce(daemon: Daemon, url: str, host: str) -> None:
    """The lines that say kvosd is ready, and how it is keyed."""
    if daemon.config.open_api:
        say = log.info if is_loopback(host) else log.warning
        say("the API is open: requests need no key (--api-key KEY or $KVOS_API_KEY would require one)%s",
            "" if is_loopback(host) else f"; anyone who reaches {host} may use it (--allow-open)")
    log.info("serving %s at %s (OpenAI API at %s/v1, docs at %s/docs)", ", ".join(daemon.models) or "no tenant",
             url, url, url)


def serve(config: DaemonConfig, host="127.0.0.1", port=8000, log_level="info", boot=None) -> int:
    """Run kvosd in the foreground until SIGTERM or SIGINT. -> exit status (0: clean shutdown).
    The port is bound (and /health served) before the models load; a model that fails to load
    stops the server: its error is logged and its errno is the exit status. boot: None boots one
    kernel; else a callable -> (system, collector) for Daemon, called once the port is bound."""
    tls = check_tls(config)
    check_exposure(host, config)
    _room_for_connections(config.max_connections)
    sock = bind(host, port)            # first: a taken port fails before a model is loaded
    try:
        daemon = Daemon(config, *boot()) if boot is not None else Daemon(config)
    except BaseException:
        sock.close()
        raise
    url = url_of(sock, tls)
    note = runtime.claim(sock.getsockname()[1], local_url(url), config.root_key)
    server = make_server(daemon, sock, log_level)
    banner = None if tls else exposure_warning(host, sock.getsockname()[1])
    for line in banner.splitlines() if banner else ():      # a line each: log lines stay one a line
        log.warning("%s", line)
    log.info("listening on %s; GET /health answers 503 until the models are loaded, then 200", url)

    def load():
        daemon.load()
        if daemon.load_error is not None:
            server.should_exit = True
        else:
            _announce(daemon, url, host)
    threading.Thread(target=load, name="kvosd-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        runtime.release(note)
    loaded = daemon.ready.is_set()
    try:
        report = daemon.close()
    except KernelPanic as err:
        log.error("shutdown found a broken kernel: %s", err)
        return 1
    if daemon.load_error is not None and not loaded:
        if not isinstance(daemon.load_error, KvosError):
            raise daemon.load_error
        log.error("the models did not load: %s", daemon.load_error)         # e.g. ENOENT: no such model
        return daemon.load_error.code or 1
    log.info("stopped; fsck clean, %d of %d frames back", report["frames_free"] + report["frames_cached"],
             report["frames_total"])
    return 0


class ServerThread:
    """kvosd in a thread of this process, on a free loopback port: for tests and embedding.

        with ServerThread(config) as srv:  ... srv.url ... srv.daemon.kernel ...
    The models are loaded before it returns (a failure is raised), unless load=False: then the
    caller runs srv.daemon.load() (/health is 503 until then). stop() drains and closes like a
    SIGTERM would and returns close()'s report. With runtime_file=True it writes (and at stop()
    removes) the runtime file, as `kvos serve` does. system and collector: as Daemon's."""

    def __init__(self, config: DaemonConfig, host="127.0.0.1", port=0, runtime_file=False, load=True,
                 system=None, collector=None):
        tls = check_tls(config)
        check_exposure(host, config)
        self.sock = bind(host, port)
        try:
            self.daemon = Daemon(config, system, collector)
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
        if load:
            self.daemon.load()
            if self.daemon.load_error is not None:
                self.stop()
                raise self.daemon.load_error

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
