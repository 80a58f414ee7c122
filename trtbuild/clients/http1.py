"""A small HTTP/1.1 keep-alive client on asyncio, for the benchmark's timed loop.

Why not aiohttp: on loopback against a Triton identity model (2-core machine, 16 requests in
flight), aiohttp took about 105 us of client CPU per request and reached 2.3-2.6k requests/s;
this client took 35-45 us and reached 4.8-8.1k requests/s on the same server: with aiohttp the
load generator, not the server, set the pace. Requests are bytes serialized before the run and written in one call;
responses are read for their status, `Content-Length` or chunked framing and `Connection: close`.
Each chunk of a chunked body is kept with its arrival time, which is what server-sent events
(`/generate_stream`) need. Arrival times are taken when the bytes are read from the socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from urllib.parse import urlsplit


class HttpConnectionError(ConnectionError):
    """The connection failed or closed before the response was complete."""


@dataclasses.dataclass
class Response:
    status: int
    body: bytes
    chunks: list[tuple[float, bytes]]  # (arrival time, data) of each chunk of a chunked body
    completed: float  # when the last byte arrived
    keep_alive: bool


class _Connection(asyncio.Protocol):
    """One connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self._start_response()

    def _start_response(self) -> None:
        self.status: int | None = None
        self.length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.chunks: list[tuple[float, bytes]] = []
        self.chunk_size: int | None = None  # -1: the last chunk was read, trailers follow

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        if self.status is not None and not self.chunked and self.length is None:
            self._complete(bytes(self.buffer), time.perf_counter())  # body delimited by the close
        else:
            self.waiter.set_exception(HttpConnectionError(f"connection closed by the server{f': {exc}' if exc else ''}"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        try:
            self._parse(now)
        except (ValueError, IndexError) as e:
            self.waiter.set_exception(HttpConnectionError(f"malformed HTTP response: {e}"))
            self.close()

    # -- parsing
    def _parse(self, now: float) -> None:
        if self.status is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            del self.buffer[: end + 4]
            version, status = head[0].split(" ", 2)[:2]
            self.status = int(status)
            self.keep_alive = version == "HTTP/1.1"
            for line in head[1:]:
                name, _, value = line.partition(":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == "content-length":
                    self.length = int(value)
                elif name == "transfer-encoding" and "chunked" in value:
                    self.chunked = True
                elif name == "connection":
                    self.keep_alive = value == "keep-alive" or (self.keep_alive and value != "close")
        if self.chunked:
            self._parse_chunks(now)
        elif self.length is not None and len(self.buffer) >= self.length:
            body = bytes(self.buffer[: self.length])
            del self.buffer[: self.length]
            self._complete(body, now)

    def _parse_chunks(self, now: float) -> None:
        while True:
            if self.chunk_size is None:
                line_end = self.buffer.find(b"\r\n")
                if line_end < 0:
                    return
                size = int(bytes(self.buffer[:line_end]).split(b";")[0], 16)
                del self.buffer[: line_end + 2]
                self.chunk_size = size if size > 0 else -1
            if self.chunk_size == -1:
                line_end = self.buffer.find(b"\r\n")
                if line_end < 0:
                    return
                del self.buffer[: line_end + 2]
                if line_end == 0:  # the empty line after the last chunk (and any trailers)
                    self._complete(b"".join(c for _, c in self.chunks), now)
                    return
                continue
            if len(self.buffer) < self.chunk_size + 2:
                return
            self.chunks.append((now, bytes(self.buffer[: self.chunk_size])))
            del self.buffer[: self.chunk_size + 2]
            self.chunk_size = None

    def _complete(self, body: bytes, now: float) -> None:
        response = Response(self.status, body, self.chunks, now, self.keep_alive)
        waiter, self.waiter = self.waiter, None
        self._start_response()
        waiter.set_result(response)

    # -- use
    def send(self, data: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def expire(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(TimeoutError("no complete response before the request timeout"))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Http1Client:
    """Keep-alive connections to one server, reused one request at a time."""

    def __init__(self, url: str, timeout: float = 600.0):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http":
            raise ValueError(f"only http:// URLs are supported, got {url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.authority = f"{self.host}:{self.port}"
        self.timeout = timeout
        self.idle: list[_Connection] = []

    def request_bytes(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.authority}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def request(self, data: bytes) -> Response:
        conn = None
        while self.idle:
            candidate = self.idle.pop()
            if not candidate.closed:
                conn = candidate
                break
        if conn is None:
            try:
                _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
            except OSError as e:
                raise HttpConnectionError(f"cannot connect to {self.authority}: {e.strerror or e}") from None
        timer = asyncio.get_running_loop().call_later(self.timeout, conn.expire)
        try:
            response = await conn.send(data)
        except BaseException:
            conn.close()
            raise
        finally:
            timer.cancel()
        if response.keep_alive and not conn.closed:
            self.idle.append(conn)
        else:
            conn.close()
        return response

    async def get(self, path: str) -> Response:
        return await self.request(self.request_bytes("GET", path))

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> Response:
        return await self.request(self.request_bytes("POST", path, body, headers))

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()
