"""An ASGI middleware that caps the size of a request: its head and, before it is read, its body.

A body over DaemonConfig.max_body_bytes is 413 E2BIG: a declared Content-Length over the cap is
answered at once, unread; a body sent in chunks is cut off as soon as it passes the cap, so nothing
over the cap is held in memory. What the client still sends after the answer is discarded by the
HTTP protocol (protocol.py), up to a bound, so that it can read the 413. A head (request line and
headers) over max_header_bytes is 431 E2BIG: the HTTP parser refuses such a head only while it is
incomplete, so one that arrives whole in one read is measured here. Answers are in the route's
shape (errors.py).
"""
from __future__ import annotations

from kernel.errors import E2BIG, KvosError
from userspace.daemon import errors


class BodyTooLarge(KvosError):
    def __init__(self, limit: int, declared: int | None = None):
        size = f"{declared:,} bytes" if declared is not None else f"more than {limit:,} bytes"
        super().__init__(E2BIG, f"the request body ({size}) is over kvosd's limit of {limit:,} bytes "
                                f"(kvos serve --max-body-bytes)")


class RequestLimits:
    def __init__(self, app, max_body_bytes: int, max_header_bytes: int):
        self.app = app
        self.max_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) + 4
                                                                        for k, v in scope["headers"])
        if head > self.max_header_bytes:
            err = KvosError(E2BIG, f"the request head ({head:,} bytes) is over kvosd's limit of "
                                   f"{self.max_header_bytes:,} bytes (kvos serve --max-header-bytes)")
            await errors.response(scope["path"], err, 431)(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, BodyTooLarge(self.max_bytes, declared))
            return
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge as err:         # raised where no route's handler turned it into a response
            if started:
                raise
            await self._refuse(scope, receive, send, err)

    async def _refuse(self, scope, receive, send, err: BodyTooLarge) -> None:
        await errors.response(scope["path"], err, 413)(scope, receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:              # the HTTP parser refuses these before we see them
                return None
    return None
