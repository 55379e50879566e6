"""One HTTP exchange with an engine's ASGI app, in-process: no socket, no second server.

The model replica serves OpenAI requests through the engine's own OpenAI app (for vLLM, the
FastAPI app of vLLM's server, built on its serving objects), so Roundhouse answers exactly as
vLLM's server does. This drives that app for one request: the body goes in once, the response
comes back as a status, headers and body chunks. Cancelling the exchange (the client left)
tells the app the client disconnected and cancels it, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
AsgiApp = Callable[[Scope, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]


def http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None
               ) -> Scope:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": method, "scheme": "http", "path": path,
        "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": headers if headers is not None else list(_JSON),
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {},
    }


class Exchange:
    """A running request to an ASGI app. `status`/`headers` are set once the app starts its
    response; body chunks are read with `next_chunks()`; `finished` once the app has sent the
    whole body or failed (then `error` holds what it raised)."""

    def __init__(self, app: AsgiApp, scope: Scope, body: bytes,
                 context: contextvars.Context | None = None) -> None:
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.error: BaseException | None = None
        self.finished = False
        self._body: bytes | None = body
        self._chunks: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._run(app, scope), context=context)

    async def _run(self, app: AsgiApp, scope: Scope) -> None:
        try:
            await app(scope, self._receive, self._send)
        except BaseException as exc:  # reported to the reader, not lost in a task
            self.error = exc
        finally:
            self.finished = True
            self._ready.set()

    async def _receive(self) -> Message:
        body, self._body = self._body, None
        if body is not None:
            return {"type": "http.request", "body": body, "more_body": False}
        await self._disconnected.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.headers = list(message.get("headers") or ())
            self._ready.set()
        elif kind == "http.response.body":
            chunk = message.get("body") or b""
            if chunk:
                self._chunks.append(bytes(chunk))
                self._ready.set()
            if not message.get("more_body", False):
                self.finished = True
                self._ready.set()

    @property
    def media_type(self) -> str:
        for name, value in self.headers:
            if name.lower() == b"content-type":
                return value.decode("latin-1")
        return "application/octet-stream"

    def pending(self) -> bool:
        return bool(self._chunks)

    async def wait(self) -> None:
        """Until there is something new: a chunk, the response start, or the end."""
        if not self._chunks and not self.finished:
            self._ready.clear()
            await self._ready.wait()

    def take(self) -> list[bytes]:
        chunks = list(self._chunks)
        self._chunks.clear()
        return chunks

    async def read_all(self) -> bytes:
        parts: list[bytes] = []
        while True:
            await self.wait()
            parts += self.take()
            if self.finished and not self._chunks:
                return b"".join(parts)

    async def close(self) -> None:
        """The client is gone (or we stop reading): disconnect and stop the app."""
        self._disconnected.set()
        if not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: S110 - its error is of no interest any more
                pass
