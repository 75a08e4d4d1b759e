"""The daemon's HTTP app: webhook endpoints (plain ASGI), health, readiness and metrics
(FastAPI).

``POST /webhooks/{provider}`` answers 2xx only once the delivery is durably in
``sync_inbox``: content type first (415), then size while reading (413: a body is never read
past the limit), then the signature (401) and the shape (400), then one transaction that
stores every event of the body (503 when the database cannot; concurrent requests share it:
``group_store``). A rejected request stores
nothing and is logged with its reason, never its body. A redelivery is 2xx and changes
nothing. An endpoint whose secret is not configured answers 404.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Engine
from starlette.types import Receive, Scope, Send

from db import inbox
from db.migrate import current_revision, head_revision
from providers.webhook import InboxItem, WebhookReceiver
from sync_worker.changes import utcnow
from sync_worker.daemon.group_store import GroupStore
from sync_worker.daemon.metrics import CONTENT_TYPE, Metrics
from sync_worker.errors import (
    StoreError,
    SyncWorkerError,
    WebhookPayloadError,
    WebhookVerificationError,
)

log = structlog.get_logger(__name__)

#: JSON, JSON lines (Auth0 log streams) and CloudEvents' JSON types.
_JSON_TYPES = frozenset(
    {"application/json", "application/x-ndjson", "application/jsonl", "application/json-lines"}
)

#: Rejections answered before the body was read whole: the connection is closed after them.
_UNREAD = frozenset({413, 415})
#: ``/webhooks/{provider}`` as Starlette's router matches it.
_JSON_TYPE = (b"content-type", b"application/json")
_WEBHOOK_PATH = re.compile(r"^/webhooks/(?P<provider>[^/]+)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """What /readyz checks besides the database: heartbeats of the daemon's loops."""

    #: name -> seconds since the loop last reported (None: not running)
    heartbeats: Callable[[], Mapping[str, float | None]] = dict
    stale_after: float = 30.0


class _Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def create_app(
    db: Engine,
    receivers: Mapping[str, WebhookReceiver],
    metrics: Metrics,
    *,
    max_body_bytes: int = 1_048_576,
    on_stored: Callable[[], None] = lambda: None,
    health: Health = Health(),
    clock: Callable[[], datetime] = utcnow,
) -> FastAPI:
    webhooks = _Webhooks(db, receivers, metrics, limit=max_body_bytes, on_stored=on_stored,
                         clock=clock)  # fmt: skip
    app = _App(webhooks)
    app.add_api_route("/healthz", _healthz, methods=["GET"])
    app.add_api_route("/readyz", _Readiness(db, health).get, methods=["GET"])
    app.add_api_route(
        "/metrics", lambda: Response(metrics.render(), media_type=CONTENT_TYPE), methods=["GET"]
    )
    return app


async def _healthz() -> dict[str, str]:
    return {"status": "ok"}


def route_path(scope: Scope) -> str:
    """The request's path below the app's mount point: ASGI's ``path`` includes the
    ``root_path`` a proxy or a mount sets (as Starlette's router reads it; its helper for
    this is private)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    rest = path[len(root) :]
    if rest and not rest.startswith("/"):
        return path  # "/apiv2" is not below "/api"
    return rest


class _App(FastAPI):
    """FastAPI, with ``POST /webhooks/{provider}`` answered in front of it, in plain ASGI.

    The webhook path reads its raw body itself and answers from a handful of statuses: it
    needs none of the framework's middleware, routing, Request or Response objects, which
    cost a fifth of a delivery's CPU in the receiving process (0.26 against 0.21 ms under
    bench/ingest.py's load). Every other request, a GET of a webhook path included (405),
    is FastAPI's.
    """

    def __init__(self, deliveries: _Webhooks) -> None:
        super().__init__(title="sync-worker", docs_url=None, redoc_url=None, openapi_url=None)
        self.deliveries = deliveries  # not ``webhooks``: FastAPI's OpenAPI webhooks router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _WEBHOOK_PATH.match(route_path(scope))
            if match is not None:
                await self.deliveries(match["provider"], scope, receive, send)
                return
        await super().__call__(scope, receive, send)


class _Webhooks:
    def __init__(
        self,
        db: Engine,
        receivers: Mapping[str, WebhookReceiver],
        metrics: Metrics,
        *,
        limit: int,
        on_stored: Callable[[], None],
        clock: Callable[[], datetime],
    ) -> None:
        self.receivers, self.metrics = receivers, metrics
        self.limit, self.clock = limit, clock
        self.group = GroupStore(db, clock, on_commit=on_stored)  # one wake-up per group

    async def __call__(self, provider: str, scope: Scope, receive: Receive, send: Send) -> None:
        receiver = self.receivers.get(provider)
        if receiver is None:  # unknown, or its secret is not configured: off
            await JSONResponse({"error": "not found"}, status_code=404)(scope, receive, send)
            return
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        try:
            _check_type(_first(raw, b"content-type"))
            body = await _read_limited(receive, _first(raw, b"content-length"), self.limit)
            if body is None:  # the client went away: nobody to answer, nothing stored
                return
            # Names in lower case, the last of a repeated name: what the receivers made of
            # Starlette's Headers (providers/webhook.py, lower_headers).
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
            items = receiver.verify(headers, body, now=self.clock())
            stored = await self._store(provider, items)
        except (_Rejected, WebhookVerificationError, WebhookPayloadError, StoreError) as exc:
            await self._reject(provider, _status(exc), str(exc))(scope, receive, send)
            return
        self.metrics.delivered(provider)
        # What Response(..., media_type="application/json") would send, without building one.
        answer = b'{"stored":%d,"duplicates":%d}' % (stored.inserted, stored.duplicates)
        headers_out = [(b"content-length", b"%d" % len(answer)), _JSON_TYPE]
        await send({"type": "http.response.start", "status": 200, "headers": headers_out})
        await send({"type": "http.response.body", "body": answer})

    async def _store(self, provider: str, items: Sequence[InboxItem]) -> inbox.StoreResult:
        try:
            return await self.group.store(provider, [_delivery(i) for i in items])
        except ValueError as exc:  # a value wider than its column
            raise _Rejected(400, str(exc)) from exc

    def _reject(self, provider: str, status: int, reason: str) -> Response:
        self.metrics.webhook_requests.labels(provider=provider, status=str(status)).inc()
        log.warning("webhook_rejected", provider=provider, status=status, reason=reason)
        error = "database unavailable" if status == 503 else reason
        headers = {"Retry-After": "5"} if status == 503 else {}
        if status in _UNREAD:  # else uvicorn keeps the connection and reads the rest anyway
            headers["Connection"] = "close"
        return JSONResponse({"error": error}, status_code=status, headers=headers)


def _status(exc: Exception) -> int:
    if isinstance(exc, _Rejected):
        return exc.status
    if isinstance(exc, WebhookVerificationError):
        return 401
    return 400 if isinstance(exc, WebhookPayloadError) else 503  # else a StoreError


def _delivery(item: InboxItem) -> inbox.Delivery:
    return inbox.Delivery(
        event_id=item.event_id,
        payload=item.payload,
        event_type=item.event_type,
        status="ignored" if item.ignored else "pending",
    )


def _check_type(value: str | None) -> None:
    media = (value or "").split(";", 1)[0].strip().lower()
    if media in _JSON_TYPES or (media.startswith("application/") and media.endswith("+json")):
        return
    raise _Rejected(415, f"content type {media or 'missing'} is not JSON")


def _first(raw: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header ``name`` (lower case, as servers give names), as
    Starlette's ``Headers.get`` reads it."""
    for key, value in raw:
        if key == name:
            return value.decode("latin-1")
    return None


async def _read_limited(receive: Receive, declared: str | None, limit: int) -> bytes | None:
    """The body, refused (413) as soon as it passes ``limit``: never read whole first.

    None when the client disconnected before the end of the body."""
    declared = declared or ""
    # isascii: str.isdigit() accepts "²" (header bytes are read as latin-1), int() does not.
    # Over 20 digits (h11's cap) is over any limit, and int() refuses 4,300 digits or more.
    if declared.isascii() and declared.isdigit() and (len(declared) > 20 or int(declared) > limit):
        raise _Rejected(413, f"body of {declared} bytes is over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Rejected(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Readiness:
    """Ready: the database answers, is migrated to this version, and the loops are alive."""

    def __init__(self, db: Engine, health: Health) -> None:
        self.db, self.health = db, health
        self.head = head_revision()

    async def get(self) -> Response:
        problems = await run_in_threadpool(self._database)
        for name, age in self.health.heartbeats().items():
            if age is None or age > self.health.stale_after:
                problems.append(f"{name}: stalled" if age is not None else f"{name}: not running")
        status = 200 if not problems else 503
        return JSONResponse({"ready": not problems, "problems": problems}, status_code=status)

    def _database(self) -> list[str]:
        try:  # reading the migration version is the round trip that proves the database
            if current_revision(self.db) != self.head:
                return ["database: not migrated to this version"]
        except (StoreError, SyncWorkerError) as exc:
            return [f"database: {exc}"]
        except Exception as exc:  # a driver error outside the store boundary
            return [f"database: {type(exc).__name__}"]
        return []
