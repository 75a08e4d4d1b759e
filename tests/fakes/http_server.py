"""A small base for fake HTTP APIs on loopback, shared by every fake IdP.

``FakeServer`` runs a ``ThreadingHTTPServer`` on 127.0.0.1, port 0, in a daemon thread. A
subclass registers routes (regular expressions, full match, named groups become
``request.params``) whose handlers turn a ``Request`` into a ``Response``. Every request is
logged, and faults can be queued per path to play the real world's failures::

    with MyFake() as fake:
        fake.fail_next("/api/v2/logs", status=503, times=2)
        fake.fail_next("/api/v2/logs", status=429, headers={"Retry-After": "0.01"})
        fake.fail_next("/download", status=None, truncate=100)   # real body, cut short
        fake.fail_next("/slow", status=None, delay=0.5)          # real body, late

A fault with ``status=None`` runs the real handler and then alters its response.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

__all__ = ["FakeServer", "Fault", "Handler", "Request", "Response", "TokenBucket"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One request as the fake saw it."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes = b""
    params: Mapping[str, str] = field(default_factory=dict)

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else default

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}


@dataclass(slots=True, kw_only=True)
class Response:
    """What a handler answers; ``truncate`` sends only that many body bytes, then hangs up."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    truncate: int | None = None

    @classmethod
    def json(
        cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Response:
        merged = {"Content-Type": "application/json", **(headers or {})}
        return cls(status=status, body=json.dumps(payload).encode(), headers=merged)


@dataclass(slots=True, kw_only=True)
class Fault:
    """A queued failure for requests whose path fully matches ``path`` (a regex)."""

    path: str
    method: str | None = None
    status: int | None = 503
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    truncate: int | None = None
    times: int = 1
    after: int = 0  # matching requests to let through first

    def matches(self, request: Request) -> bool:
        method_ok = self.method is None or self.method.upper() == request.method
        return method_ok and re.fullmatch(self.path, request.path) is not None

    def apply(self, response: Response | None) -> Response:
        if self.status is not None or response is None:
            body = self.body if self.body is not None else _error_body(self.status or 503)
            response = Response(status=self.status or 503, body=body)
            response.headers["Content-Type"] = "application/json"
        headers = {**response.headers, **self.headers}
        truncate = self.truncate if self.truncate is not None else response.truncate
        return replace(
            response, headers=headers, delay=response.delay + self.delay, truncate=truncate
        )


Handler = Callable[[Request], Response]


class TokenBucket:
    """A rate limit like Auth0's: burst ``capacity``, refilled at ``per_second``.

    ``take()`` answers whether a request may pass and the ``x-ratelimit-*`` headers to send:
    limit, remaining after this request, and reset = UNIX time of the next refill. Real APIs
    send whole seconds; fractional resets (the default) keep tests fast, and clients parse both.
    """

    def __init__(self, capacity: int, per_second: float, *, whole_seconds: bool = False) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self.whole_seconds = whole_seconds
        self._tokens = float(capacity)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> tuple[bool, dict[str, str]]:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.per_second)
            self._at = now
            allowed = self._tokens >= 1
            if allowed:
                self._tokens -= 1
            return allowed, self._headers()

    def _headers(self) -> dict[str, str]:
        missing = 0.0 if self._tokens >= self.capacity else 1 - (self._tokens % 1)
        reset = time.time() + missing / self.per_second
        # Round up, never down: a reset shown early would invite a 429.
        shown = (
            f"{math.ceil(reset)}" if self.whole_seconds else f"{math.ceil(reset * 1000) / 1000:.3f}"
        )
        return {
            "x-ratelimit-limit": str(self.capacity),
            "x-ratelimit-remaining": str(int(self._tokens)),
            "x-ratelimit-reset": shown,
        }


class FakeServer:
    """Base class: routes, a request log, fault injection; a context manager."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.requests: list[Request] = []
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._faults: list[Fault] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up -------------------------------------------------------------------------

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method.upper(), re.compile(pattern), handler))

    def fail_next(
        self, path: str, *, status: int | None = 503, times: int = 1, **kwargs: Any
    ) -> None:
        """Queue a fault for the next ``times`` requests to ``path`` (see ``Fault``)."""
        body = kwargs.pop("body", None)
        if isinstance(body, str):
            body = body.encode()
        elif body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        with self.lock:
            self._faults.append(Fault(path=path, status=status, times=times, body=body, **kwargs))

    # -- inspection ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("fake server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def requests_to(self, path: str, method: str | None = None) -> list[Request]:
        """Logged requests whose path fully matches ``path`` (a regex)."""
        with self.lock:
            logged = list(self.requests)
        return [
            r
            for r in logged
            if re.fullmatch(path, r.path) and (method is None or r.method == method.upper())
        ]

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        # A short poll interval keeps ``stop()`` (and so every test using a fake) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling (override ``dispatch`` to wrap every route) ----------------------

    def dispatch(self, request: Request) -> Response:
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match and method == request.method:
                return handler(replace(request, params=match.groupdict()))
        return Response.json({"statusCode": 404, "error": "Not Found"}, status=404)

    def handle(self, request: Request) -> Response:
        with self.lock:
            self.requests.append(request)
            fault = self._take_fault(request)
            if fault is not None and fault.status is not None:
                return fault.apply(None)
            response = self.dispatch(request)
        return fault.apply(response) if fault is not None else response

    def _take_fault(self, request: Request) -> Fault | None:
        for fault in self._faults:
            if fault.matches(request):
                if fault.after > 0:
                    fault.after -= 1
                    continue
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None


def _error_body(status: int) -> bytes:
    return json.dumps(
        {"statusCode": status, "error": "Injected fault", "message": "fault"}
    ).encode()


def _handler_class(fake: FakeServer) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10  # an idle keep-alive connection must not pin a thread forever
        # Headers and body go out in separate writes; with Nagle on, each keep-alive
        # request would stall ~40 ms on the client's delayed ACK.
        disable_nagle_algorithm = True

        def _serve(self) -> None:
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            request = Request(
                method=self.command,
                path=split.path,
                query=parse_qs(split.query, keep_blank_values=True),
                headers=dict(self.headers.items()),
                body=self.rfile.read(length) if length else b"",
            )
            self._write(fake.handle(request))

        def _write(self, response: Response) -> None:
            if response.delay:
                time.sleep(response.delay)
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            body = response.body
            if response.truncate is not None:
                body = body[: response.truncate]
                self.close_connection = True
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Silence the default stderr access log."""

        def handle(self) -> None:
            # The client gave up (a read timeout in a test): nothing to report.
            with contextlib.suppress(ConnectionError, TimeoutError):
                super().handle()

    return _Handler
