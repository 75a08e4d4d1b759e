"""The shared HTTP policy of every provider adapter: one session, timeouts, retries, pacing.

``HttpClient`` wraps one ``requests.Session`` and turns HTTP into the project's error tree
at this boundary::

    status in ok                      -> the response is returned
    429 (after retries)               -> RateLimitedError (retry_after = the last hint)
    5xx, timeout, connection (after)  -> UpstreamUnavailable
    refused, unknown host (after)     -> UpstreamUnreachable (an UpstreamUnavailable)
    401 (after one on_unauthorized)   -> ProviderAuthError
    403                               -> ProviderAuthError
    other 4xx                         -> HttpStatusError (a ProviderError with .status)
    a body that is not JSON           -> UpstreamDataError (get_json)

Retries (tenacity, built in ``_retrying``) cover exactly 429, 5xx, timeouts and connection
errors. The wait honours ``Retry-After`` (seconds or an HTTP date), then ``x-ratelimit-reset``
(UNIX seconds), else exponential backoff with jitter; attempts and total retry time are
bounded, and a wait that would pass the time budget ends the retries at once. A connection
nothing accepts (refused, or a host name that does not resolve) gets only
``unreachable_attempts``: see ``HttpPolicy``.

Error messages name the provider, the method, the URL without credentials or query string
(``stack: GET https://api.example.com/api/v1/users``), the reason (``connection refused``,
``HTTP 503``) and, after retries, how many attempts over how long. The text of a requests or
urllib3 exception is never used: it quotes the URL, query string included.

Pacing keeps a run under the advertised limit instead of running into 429s: every response's
``x-ratelimit-limit/remaining/reset`` is remembered per endpoint group, and once ``remaining``
falls to half the limit the remaining budget is spread evenly until the reset.
"""

from __future__ import annotations

import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urljoin, urlsplit

import orjson
import requests
import structlog
import urllib3
from tenacity import RetryCallState, Retrying, retry_if_exception_type

from sync_worker.errors import (
    ProviderAuthError,
    ProviderError,
    RateLimitedError,
    UpstreamDataError,
    UpstreamUnavailable,
)
from sync_worker.runtime import collector_paused

if TYPE_CHECKING:
    from sync_worker.config import HttpSettings

__all__ = [
    "HttpClient",
    "HttpPolicy",
    "HttpStats",
    "HttpStatusError",
    "UpstreamStatusError",
    "UpstreamUnreachable",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Spread the budget once fewer than this share of the bucket is left.
_LOW_WATER = 0.5
# A body cut short (ChunkedEncodingError) is as transient as a dropped connection.
_BODY_CHUNK_BYTES = 1 << 20
_TRANSIENT_NETWORK = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpPolicy:
    """Timeouts, retry bounds and pacing of one provider's HTTP traffic.

    ``unreachable_attempts`` bounds the attempts (within ``max_attempts``) when nothing takes
    the connection: refused, or the host name does not resolve. That is a wrong base URL or a
    service that is down far more often than a blip, and the full backoff (8 attempts, about
    a minute) only delayed the one line a CLI user needs; the daemon's next scheduled pull is
    the retry that matters there. Three attempts (about 1.5 s) still ride out a restart's
    refused connections. Timeouts, resets and 5xx keep the full budget.
    """

    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 8
    max_retry_seconds: float = 300.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    requests_per_second: float | None = None
    unreachable_attempts: int = 3

    @classmethod
    def from_settings(cls, s: HttpSettings) -> HttpPolicy:
        return cls(
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            max_attempts=s.max_attempts,
            max_retry_seconds=s.max_retry_seconds,
            requests_per_second=s.requests_per_second,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpStats:
    """Counters of one client: requests sent, retries, 429s met, seconds spent waiting."""

    requests: int = 0
    retries: int = 0
    throttled_429: int = 0
    waited_seconds: float = 0.0


class HttpStatusError(ProviderError):
    """A non-retryable 4xx answer other than 401/403."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class UpstreamStatusError(UpstreamUnavailable):
    """A 5xx answer (retried; raised once the retries are spent)."""

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class UpstreamUnreachable(UpstreamUnavailable):
    """Nothing took the connection (refused, unknown host); see ``unreachable_attempts``."""


@dataclass(slots=True)
class _Bucket:
    """The last rate-limit headers seen for one endpoint group."""

    limit: int
    remaining: int
    reset_in: float  # seconds from ``seen_at`` until the bucket refills
    seen_at: float  # monotonic


class HttpClient:
    """One provider's HTTP session with the shared policy (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        *,
        provider: str,
        policy: HttpPolicy = HttpPolicy(),
        headers: Mapping[str, str] | None = None,
        auth: Callable[[], Mapping[str, str]] | None = None,
        on_unauthorized: Callable[[], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.provider = provider
        self.policy = policy
        self._auth = auth
        self._on_unauthorized = on_unauthorized
        self._sleep = sleep
        self._clock = clock
        self._wall = wall_clock
        self._session = requests.Session()
        self._session.headers.update({"User-Agent": "sync-worker", **(headers or {})})
        self._origin = _origin(self.base_url)
        self._buckets: dict[str, _Bucket] = {}
        self._last_sent: float | None = None
        self._lock = threading.Lock()
        self._stats = HttpStats()

    # -- public API --------------------------------------------------------------------

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        stream: bool = False,
        ok: Collection[int] = (200,),
    ) -> requests.Response:
        """Send with retries and pacing; return a response whose status is in ``ok``."""
        url = self._url(path_or_url)
        send = _Send(
            method=method.upper(), url=url, params=params, json=json, data=data, stream=stream
        )
        response = self._send_with_retries(send, ok)
        if response.status_code == 401 and self._on_unauthorized is not None and 401 not in ok:
            response.close()
            self._on_unauthorized()
            response = self._send_with_retries(send, ok)
        if response.status_code not in ok:
            response.close()
            raise self._status_error(send, response.status_code)
        return response

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET and decode a JSON body; a body that is not JSON is an UpstreamDataError."""
        response = self.request("GET", path, params=params)
        try:
            return json_body(response)
        except ValueError as exc:
            raise UpstreamDataError(
                f"{self.provider}: GET {_path(response.url)}: invalid JSON"
            ) from exc

    def call(self, fn: Callable[[], T], *, method: str, path_or_url: str) -> T:
        """Run a request this client does not send itself (e.g. an OAuth token fetch by
        authlib) under the same retry policy; ``fn`` reports a 429/5xx answer through
        ``check_transient`` and network failures as UpstreamUnavailable."""
        send = _Send(method=method.upper(), url=self._url(path_or_url))
        retrying = _retrying(self.policy, self._sleep, self._clock, self._before_sleep(send))
        return self._counting_attempts(retrying, fn)

    def check_transient(self, response: requests.Response) -> requests.Response:
        """Raise for a 429 or 5xx answer exactly as ``request`` would; else return it."""
        send = _Send(method=str(response.request.method), url=str(response.request.url))
        self._count(requests=1)
        self._remember_limits(send, response)
        return self._classify(send, response, ())

    def network_error(
        self, method: str, path_or_url: str, exc: requests.RequestException
    ) -> ProviderError:
        """The error ``request`` raises for ``exc``, for a request sent by someone else (an
        OAuth token fetch): it names the URL and the reason, and is retried alike."""
        send = _Send(method=method.upper(), url=self._url(path_or_url))
        return _network_error(self._where(send), exc)

    @property
    def stats(self) -> HttpStats:
        return self._stats

    def close(self) -> None:
        self._session.close()

    # -- retries -----------------------------------------------------------------------

    def _send_with_retries(self, send: _Send, ok: Collection[int]) -> requests.Response:
        # Credentials are resolved once, outside the loop: a token fetch has its own retries,
        # and nesting them inside these would multiply the attempts.
        headers = self._auth_headers(send.url)
        retrying = _retrying(self.policy, self._sleep, self._clock, self._before_sleep(send))
        return self._counting_attempts(retrying, lambda: self._attempt(send, headers, ok))

    def _counting_attempts(self, retrying: Retrying, fn: Callable[[], T]) -> T:
        """Run ``fn`` under ``retrying``; a transient error that outlived its retries says
        how many attempts it took over how long."""
        started = self._clock()
        try:
            return retrying(fn)
        except (RateLimitedError, UpstreamUnavailable) as exc:
            attempts = int(retrying.statistics.get("attempt_number", 1))
            if attempts > 1:
                elapsed = _duration(self._clock() - started)
                # The message lives in args; the exception keeps its type, status and cause.
                exc.args = (f"{exc} (after {attempts} attempts over {elapsed})",)
            raise

    def _attempt(
        self, send: _Send, headers: Mapping[str, str] | None, ok: Collection[int]
    ) -> requests.Response:
        self._pace(send)
        try:
            response = self._session.request(
                send.method,
                send.url,
                params=send.params,
                json=send.json,
                data=send.data,
                stream=True,
                headers=headers,
                timeout=(self.policy.connect_timeout, self.policy.read_timeout),
                allow_redirects=False,
            )
            if not send.stream:
                _read_body(response)
        except requests.RequestException as exc:
            raise _network_error(self._where(send), exc) from exc
        finally:
            self._count(requests=1)
        self._remember_limits(send, response)
        return self._classify(send, response, ok)

    def _classify(
        self, send: _Send, response: requests.Response, ok: Collection[int]
    ) -> requests.Response:
        status = response.status_code
        if status in ok or (status < 500 and status != 429):
            return response
        hint = self._retry_after(response)
        response.close()
        if status == 429:
            self._count(throttled_429=1)
            raise RateLimitedError(f"{self._where(send)}: rate limited (429)", retry_after=hint)
        raise UpstreamStatusError(f"{self._where(send)}: HTTP {status}", status, hint)

    def _before_sleep(self, send: _Send) -> Callable[[RetryCallState], None]:
        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            cause = error.__cause__ if error is not None else None
            self._count(retries=1, waited_seconds=state.upcoming_sleep)
            log.warning(
                "http_retry",
                provider=self.provider,
                method=send.method,
                path=_path(send.url),
                status=_status_of(error),
                error=type(cause).__name__ if cause is not None else None,
                attempt=state.attempt_number,
                wait=round(state.upcoming_sleep, 3),
            )

        return before_sleep

    def _retry_after(self, response: requests.Response) -> float | None:
        """The server's wait hint: Retry-After, else x-ratelimit-reset (on 429 only)."""
        value = response.headers.get("Retry-After")
        if value is not None:
            return _parse_retry_after(value, self._wall())
        reset = response.headers.get("x-ratelimit-reset")
        if response.status_code == 429 and reset is not None:
            return _seconds_until(reset, self._wall())
        return None

    # -- pacing ------------------------------------------------------------------------

    def _pace(self, send: _Send) -> None:
        now = self._clock()
        with self._lock:
            delay = max(self._rate_cap_delay(now), self._bucket_delay(_bucket_key(send), now))
            self._last_sent = now + delay
        if delay > 0:
            self._count(waited_seconds=delay)
            self._sleep(delay)

    def _rate_cap_delay(self, now: float) -> float:
        rps = self.policy.requests_per_second
        if rps is None or self._last_sent is None:
            return 0.0
        return max(0.0, self._last_sent + 1.0 / rps - now)

    def _bucket_delay(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None or bucket.remaining > bucket.limit * _LOW_WATER:
            return 0.0
        until_reset = bucket.seen_at + bucket.reset_in - now
        if until_reset <= 0:
            return 0.0
        # Spread what is left evenly until the refill; with nothing left, wait for it.
        return until_reset / bucket.remaining if bucket.remaining > 0 else until_reset

    def _remember_limits(self, send: _Send, response: requests.Response) -> None:
        headers = response.headers
        try:
            limit = int(headers["x-ratelimit-limit"])
            remaining = int(headers["x-ratelimit-remaining"])
            reset_in = _seconds_until(headers["x-ratelimit-reset"], self._wall())
        except (KeyError, ValueError):
            return
        with self._lock:
            self._buckets[_bucket_key(send)] = _Bucket(limit, remaining, reset_in, self._clock())

    # -- helpers -----------------------------------------------------------------------

    def _url(self, path_or_url: str) -> str:
        if urlsplit(path_or_url).scheme:
            return path_or_url
        return urljoin(self.base_url + "/", path_or_url.lstrip("/"))

    def _auth_headers(self, url: str) -> Mapping[str, str] | None:
        # Credentials go to the provider's own origin only, never to a signed download URL.
        if self._auth is None or _origin(url) != self._origin:
            return None
        return self._auth()

    def _where(self, send: _Send) -> str:
        return f"{self.provider}: {send.method} {_display_url(send.url)}"

    def _status_error(self, send: _Send, status: int) -> ProviderError:
        where = self._where(send)
        if status in (401, 403):
            return ProviderAuthError(f"{where}: credentials rejected (HTTP {status})")
        return HttpStatusError(f"{where}: HTTP {status}", status)

    def _count(self, **increments: float) -> None:
        with self._lock:
            values = {k: getattr(self._stats, k) + v for k, v in increments.items()}
            self._stats = replace(self._stats, **values)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Send:
    method: str
    url: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    data: Any = None
    stream: bool = False


class _Backoff:
    """The wait before each retry, computed once per attempt so ``stop`` can see it too."""

    def __init__(self, policy: HttpPolicy) -> None:
        self.policy = policy
        self._waits: dict[int, float] = {}

    def __call__(self, state: RetryCallState) -> float:
        if state.attempt_number not in self._waits:
            self._waits[state.attempt_number] = self._compute(state)
        return self._waits[state.attempt_number]

    def _compute(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        hint = getattr(error, "retry_after", None)
        if hint is not None:
            return max(0.0, float(hint))
        base, cap = self.policy.backoff_base, self.policy.backoff_max
        exponential = min(cap, base * 2.0 ** (state.attempt_number - 1))
        return min(cap, exponential + random.uniform(0, base))


def _retrying(
    policy: HttpPolicy,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    before_sleep: Callable[[RetryCallState], None],
) -> Retrying:
    """The one retry policy: transient errors only, bounded by attempts and total time."""
    backoff = _Backoff(policy)
    started = clock()

    def stop(state: RetryCallState) -> bool:
        if state.attempt_number >= policy.max_attempts:
            return True
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, UpstreamUnreachable):
            return state.attempt_number >= policy.unreachable_attempts
        return clock() - started + backoff(state) > policy.max_retry_seconds

    return Retrying(
        retry=retry_if_exception_type((RateLimitedError, UpstreamUnavailable)),
        wait=backoff,
        stop=stop,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def _bucket_key(send: _Send) -> str:
    """Endpoint group of a request: method, host and the first three path segments."""
    split = urlsplit(send.url)
    segments = split.path.strip("/").split("/")[:3]
    return f"{send.method} {split.netloc}/{'/'.join(segments)}"


def _parse_retry_after(value: str, now: float) -> float | None:
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


def _seconds_until(unix_seconds: str, now: float) -> float:
    return max(0.0, float(unix_seconds) - now)


def _status_of(error: BaseException | None) -> int | None:
    if isinstance(error, RateLimitedError):
        return 429
    return error.status if isinstance(error, UpstreamStatusError) else None


def _path(url: str) -> str:
    """The path of a URL only: query strings may carry secrets (signed download URLs)."""
    return urlsplit(url).path or "/"


def _display_url(url: str) -> str:
    """Scheme, host, port and path: never user:password@ nor the query string."""
    split = urlsplit(url)
    host = split.hostname or ""
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    try:
        port = f":{split.port}" if split.port is not None else ""
    except ValueError:  # not a number: the request itself fails on it (InvalidURL)
        port = ""
    return f"{split.scheme}://{host}{port}{split.path or '/'}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


# What failed, found among an exception's causes; the first match wins.
_NETWORK_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (socket.gaierror, "host not found"),
    (ssl.SSLError, "TLS handshake failed"),
    (ConnectionResetError, "connection reset"),
    # A read timeout while streaming a body reaches us as a ConnectionError.
    (urllib3.exceptions.ReadTimeoutError, "read timed out"),
    (TimeoutError, "timed out"),
)
_UNREACHABLE = frozenset(("connection refused", "host not found"))


def _network_error(where: str, exc: requests.RequestException) -> ProviderError:
    """The project's error for a request that got no answer, e.g. ``stack: GET
    https://127.0.0.1:9/api/v1/teams: connection refused``; retried unless it is neither
    a network nor a timeout failure (an invalid URL, say)."""
    reason = _network_reason(exc)
    message = f"{where}: {reason}"
    if reason in _UNREACHABLE:
        return UpstreamUnreachable(message)
    if isinstance(exc, _TRANSIENT_NETWORK):
        return UpstreamUnavailable(message)
    return ProviderError(message)


def _network_reason(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.ConnectTimeout):
        return "connect timed out"
    if isinstance(exc, requests.Timeout):
        return "read timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection dropped mid-response"
    causes = list(_causes(exc))
    for kind, reason in _NETWORK_REASONS:
        if any(isinstance(cause, kind) for cause in causes):
            return reason
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__  # e.g. InvalidURL: a request this worker built wrong


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it wraps: requests nests urllib3's, which nests the OSError."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending and len(seen) < 20:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        nested = [*current.args, getattr(current, "reason", None)]
        nested += [current.__cause__, current.__context__]
        pending += [n for n in nested if isinstance(n, BaseException)]


def _origin(url: str) -> tuple[str, str]:
    split = urlsplit(url)
    return split.scheme, split.netloc


def _read_body(response: requests.Response) -> None:
    """Read the whole body now, as requests does without ``stream``, but 1 MiB at a time.

    requests reads 10 KiB at a time, and every read is a hand-off of the GIL between the
    thread that reads ahead and the thread applying batches: a 500 KB Stack page cost about
    60 of them, and the engine ran ~10% slower next to it (A/B runs of the Stack pull).
    ``content`` then returns what was read (requests keeps it in ``_content``).
    """
    try:
        response._content = b"".join(response.iter_content(_BODY_CHUNK_BYTES)) or b""
    except BaseException:
        response.close()
        raise


def json_body(response: requests.Response) -> Any:
    """The decoded JSON body; ValueError when it is not JSON (or not UTF-8, as JSON must be).

    orjson rather than ``response.json()``: decoding was a tenth of a Stack page's cost.
    The collector waits: everything decoded lives at least as long as the call.
    """
    with collector_paused():
        return orjson.loads(response.content)
