"""HTTP behind one narrow seam: a `Transport` turns a `Request` into a streamed `Response`.

The provider client (`orchestrator.providers`) and the worker client
(`orchestrator.backends.client`) send every request through one. The real ones are
`HttpcoreTransport` (the provider pool, whose sockets end at the request's deadline) and
`HttpxTransport` (plain HTTP to worker processes on 127.0.0.1); a test passes a
`MockTransport` to `Orchestrator.open(transport=...)` and runs tasks without sockets. What
a transport must not change stays with its callers: the deadline (`deadline.within`), the
limit on a reply's size (read as it streams) and the redaction of credentials.

Imported by worker processes (through `providers`), so it imports neither `typing` nor
`dataclasses` at run time, nor an HTTP library before the first request (ADR-0008).
"""

from __future__ import annotations

from functools import cache

from orchestrator.errors import OrchestratorError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any, Protocol
else:
    Protocol = object


class TransportError(OrchestratorError, RuntimeError):
    """The request got no answer; the message is the HTTP library's own."""


class TransportTimeout(TransportError):
    """No answer in time."""


class TransportUnreachable(TransportError):
    """The connection failed or broke; `refused` when none was ever made (the request
    never reached the other side)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class TransportInvalid(TransportError):
    """The request cannot be sent as it is (a bad url or header)."""


class Request:
    """One HTTP request: `timeout` bounds each network operation (the caller's deadline,
    if any, bounds the whole)."""

    __slots__ = ("content", "headers", "method", "timeout", "url")

    def __init__(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        content: bytes,
        timeout: float,
    ) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.content = content
        self.timeout = timeout


class Response:
    """One HTTP answer whose body is read as it streams (`iter_bytes`); a context manager
    that releases the connection on exit."""

    __slots__ = ("_close", "_stream", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]],
        stream: Iterable[bytes] = (),
        close: Callable[[], None] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self._stream = stream
        self._close = close

    def header(self, name: str) -> str | None:
        """The first header called `name` (any case), stripped; None when absent."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value.strip()
        return None

    def iter_bytes(self) -> Iterator[bytes]:
        """The body, chunk by chunk, as it arrives."""
        yield from self._stream

    def close(self) -> None:
        """Release the connection (the rest of the body is not read)."""
        if self._close is not None:
            self._close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport(Protocol):
    """Sends requests. Failures to get an answer raise `TransportError`'s kinds; an answer
    of any status is a `Response`."""

    def handle(self, request: Request) -> Response: ...


class MockTransport:
    """A transport answered by a function, without sockets (for tests); it keeps every
    request it saw, in order, in `requests`."""

    def __init__(self, handler: Callable[[Request], Response]) -> None:
        self.handler = handler
        self.requests: list[Request] = []

    def handle(self, request: Request) -> Response:
        """Record the request and answer it with the handler."""
        self.requests.append(request)
        return self.handler(request)


class HttpcoreTransport:
    """The provider client's real transport: one pooled httpcore client whose sockets end
    every operation at the calling thread's deadline (`deadline.within`)."""

    def handle(self, request: Request) -> Response:
        """Send over the pool; the body streams from the socket as it is read."""
        extensions = {
            "timeout": dict.fromkeys(("connect", "read", "write", "pool"), request.timeout)
        }
        with _httpcore_errors():
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers]
            # `stream` (not `handle_request`) adds the Host and Content-Length headers.
            opened = _httpcore_pool().stream(
                request.method,
                request.url,
                headers=headers,
                content=request.content,
                extensions=extensions,
            )
            resp = opened.__enter__()
        return Response(
            resp.status,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.headers],
            _guarded(resp.iter_stream(), _httpcore_errors),
            lambda: opened.__exit__(None, None, None),
        )


@cache
def _httpcore_pool() -> Any:
    import socket
    import ssl

    import httpcore

    from orchestrator.deadline import DeadlineBackend

    # One pool per process (building a TLS context loads the CA bundle); Nagle off for small
    # bodies. httpcore directly, not httpx: its sockets take a network backend, and ours ends
    # every operation at the request's deadline.
    return httpcore.ConnectionPool(
        ssl_context=ssl.create_default_context(),
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        network_backend=DeadlineBackend(),
    )


class _httpcore_errors:
    """httpcore's failures as `TransportError`s (a context manager)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        import httpcore

        if exc is None:
            return
        if isinstance(exc, httpcore.TimeoutException):
            raise TransportTimeout(str(exc)) from None
        if isinstance(exc, httpcore.ConnectError):
            raise TransportUnreachable(str(exc), refused=True) from None
        if isinstance(exc, httpcore.NetworkError | httpcore.RemoteProtocolError):
            raise TransportUnreachable(str(exc)) from None
        if isinstance(exc, httpcore.UnsupportedProtocol | httpcore.LocalProtocolError | ValueError):
            raise TransportInvalid(str(exc)) from None


class HttpxTransport:
    """The worker client's real transport: plain HTTP on 127.0.0.1 through one shared
    httpx client."""

    def handle(self, request: Request) -> Response:
        """Send through the client; the body streams as it is read."""
        client = _httpx_client()
        with _httpx_errors():
            resp = client.send(
                client.build_request(
                    request.method,
                    request.url,
                    headers=request.headers,
                    content=request.content or None,
                    timeout=request.timeout,
                ),
                stream=True,
            )
        return Response(
            resp.status_code,
            list(resp.headers.items()),
            _guarded(resp.iter_bytes(), _httpx_errors),
            resp.close,
        )


@cache
def _httpx_client() -> Any:
    # Workers speak plain HTTP on 127.0.0.1. An empty trust store skips loading the CA bundle
    # (~40 ms per client) and refuses any TLS peer; trust_env=False keeps proxy variables from
    # routing loopback traffic elsewhere; Nagle off, or keep-alive requests wait ~40 ms on
    # delayed ACKs. One client per process, shared by threads.
    import socket
    import ssl

    import httpx

    transport = httpx.HTTPTransport(
        verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        limits=httpx.Limits(max_keepalive_connections=32, keepalive_expiry=20.0),
    )
    return httpx.Client(transport=transport, trust_env=False)


class _httpx_errors:
    """httpx's failures as `TransportError`s (a context manager)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        import httpx

        if exc is None:
            return
        if isinstance(exc, httpx.TimeoutException):
            raise TransportTimeout(str(exc)) from None
        if isinstance(exc, httpx.ConnectError):
            raise TransportUnreachable(str(exc), refused=True) from None
        if isinstance(exc, httpx.HTTPError):
            raise TransportUnreachable(str(exc)) from None


def _guarded(chunks: Iterable[bytes], errors: Callable[[], Any]) -> Iterator[bytes]:
    """`chunks`, with the library's failures while streaming mapped by `errors`."""
    it = iter(chunks)
    while True:
        with errors():
            chunk = next(it, None)
        if chunk is None:
            return
        yield chunk


@cache
def default_provider_transport() -> Transport:
    """The provider client's transport when none is given."""
    return HttpcoreTransport()


@cache
def default_worker_transport() -> Transport:
    """The worker client's transport when none is given."""
    return HttpxTransport()
