"""Every error kvosd answers, in the shape of its route: OpenAI's {"error": {...}} under /v1,
{"errno", "code", "message"} everywhere else. install() puts a handler on each way a request can
fail (the kernel's KvosError, a missing key, a panic, Starlette's own 404/405, FastAPI's validation
errors, any other exception), so no route answers FastAPI's {"detail": ...} or a plain-text 500.
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kernel.errors import E2BIG, EAGAIN, EBUSY, EINVAL, EIO, ENOENT, EPERM, KernelPanic, KvosError
from userspace.daemon import wire

log = logging.getLogger("kvosd")

# The errno an HTTP status stands for when the error did not come from the kernel (Starlette's 404/405).
STATUS_ERRNO = {400: EINVAL, 401: EPERM, 403: EPERM, 404: ENOENT, 405: EINVAL, 409: EBUSY, 413: E2BIG,
                429: EAGAIN, 503: EAGAIN}
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
                413: "invalid_request_error", 429: "rate_limit_error"}


class Unauthorized(Exception):
    """No bearer key, one nobody was given, or the key of a tenant that no longer exists: 401."""


OPENAI_SHAPED = ("/tokenize", "/detokenize", "/tokenizer_info")     # vLLM's routes outside /v1, in its shape


def is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path in OPENAI_SHAPED


def openai_error(err: KvosError, status: int) -> dict:
    return {"error": {"message": err.reason, "type": OPENAI_TYPES.get(status, "server_error"), "param": None,
                      "code": err.errno, "errno": err.errno}}


def body(path: str, err: KvosError, status: int) -> dict:
    return openai_error(err, status) if is_openai(path) else wire.error_body(err.errno, err.code, err.reason)


class SafeJSONResponse(JSONResponse):
    """A message may quote what the client sent: text that is not valid UTF-8 (a lone surrogate)
    is escaped rather than failing the response."""

    def render(self, content) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def response(path: str, err: KvosError, status: int, headers: dict | None = None) -> JSONResponse:
    return SafeJSONResponse(body(path, err, status), status_code=status, headers=headers)


def from_status(status: int, message: str) -> KvosError:
    return KvosError(STATUS_ERRNO.get(status, EINVAL if status < 500 else EIO), message)


def install(app: FastAPI, daemon) -> None:
    @app.exception_handler(KvosError)
    async def kvos_error(request: Request, err: KvosError):
        status = daemon.http_status(err)
        loading = status == 503 and not daemon.ready.is_set()       # worth retrying soon (curl --retry does)
        return response(request.url.path, err, status, {"Retry-After": "1"} if loading else None)

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, err: Unauthorized):
        return response(request.url.path, KvosError(EPERM, str(err)), 401, {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(KernelPanic)
    async def panic(request: Request, err: KernelPanic):
        if is_openai(request.url.path):
            content = {"error": {"message": str(err), "type": "server_error", "param": None, "code": None,
                                 "errno": None, "panic": True}}
        else:
            content = {"errno": None, "code": None, "message": str(err), "panic": True}
        return SafeJSONResponse(content, status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        if err.status_code == 404:
            message = f"no route {request.url.path} (GET /openapi.json lists them)"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path} (allowed: " \
                      f"{(err.headers or {}).get('Allow', 'none')})"
        else:
            message = str(err.detail)
        return response(request.url.path, from_status(err.status_code, message), err.status_code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = (err.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return response(request.url.path, KvosError(EINVAL, f"{where}: {first.get('msg', 'invalid')}"), 400)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        # A bug in kvosd: the traceback goes to the log (Starlette re-raises it to uvicorn after this).
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(err).__name__, err)
        return response(request.url.path, KvosError(EIO, f"internal error in kvosd ({type(err).__name__}); "
                                                         "the daemon's log has the traceback"), 500)
