"""An in-process daemon for tests: the real app over ASGI, the real drainer, a real database.

Deliveries are built and signed by ``sync_worker.simulate`` (the real svix and
standardwebhooks libraries), posted through FastAPI's test client, stored by the app and
drained by ``drain_once``: every path of a delivery runs as in the daemon, in one process.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx2
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from db.tables import sync_inbox
from providers import registry
from sync_worker import simulate
from sync_worker.config import settings_from_mapping
from sync_worker.daemon.app import create_app
from sync_worker.daemon.drain_host import counts_of
from sync_worker.daemon.drainer import Drainer, DrainSettings
from sync_worker.daemon.metrics import Metrics
from sync_worker.engine import PlanSettings, SyncEngine

SECRETS: Mapping[str, str] = {
    "stack": "whsec_" + "c3RhY2stdGVzdC1zZWNyZXQtMzItYnl0ZXMhIQ==",
    "authjs": "whsec_" + "YXV0aGpzLXRlc3Qtc2VjcmV0LTMyLWJ5dGVzISE=",
    "auth0": "auth0-log-stream-token-for-tests",
}


@dataclass
class Harness:
    db: Engine
    client: TestClient
    drainer: Drainer
    metrics: Metrics
    woken: list[int] = field(default_factory=list)
    _emails: Iterator[int] = field(default_factory=itertools.count)

    def send(
        self,
        provider: str,
        event: str,
        *,
        email: str = "ada@example.org",
        event_id: str | None = None,
        now: datetime | None = None,
    ) -> httpx2.Response:
        headers, body = simulate.build(
            provider,
            event,
            email=email,
            now=now or datetime.now(UTC),
            secret=SECRETS[provider],
            event_id=event_id,
        )
        return self.post(provider, body, headers)

    def post(self, provider: str, body: bytes, headers: Mapping[str, str]) -> httpx2.Response:
        return self.client.post(f"/webhooks/{provider}", content=body, headers=dict(headers))

    def drain(self) -> int:
        """Drain until the inbox has nothing due; returns the rows claimed."""
        total = 0
        while claimed := self.drainer.drain_once():
            total += claimed
        return total

    def inbox(self) -> list[dict[str, Any]]:
        with self.db.connect() as conn:
            rows = conn.execute(select(sync_inbox).order_by(sync_inbox.c.id)).mappings()
            return [dict(r) for r in rows]


def settings_with_secrets(url: str = "sqlite:///:memory:", **providers: Any) -> Any:
    return settings_from_mapping(
        {
            "database": {"url": url},
            "providers": {
                "auth0": {"webhook_token": SECRETS["auth0"], **providers.get("auth0", {})},
                "stack": {"webhook_secret": SECRETS["stack"], **providers.get("stack", {})},
                "authjs": {"webhook_secret": SECRETS["authjs"], **providers.get("authjs", {})},
            },
        }
    )


def harness(
    db: Engine,
    *,
    max_body_bytes: int = 1_048_576,
    drain: DrainSettings | None = None,
    receivers: Mapping[str, Any] | None = None,
    lookups: Mapping[str, Any] | None = None,
) -> Harness:
    settings = settings_with_secrets()
    metrics = Metrics(db)
    drainer = Drainer(
        db,
        SyncEngine(PlanSettings()),
        registry.decoders(settings),
        lookups or {},
        drain or DrainSettings(),
        observe=lambda result, seconds: metrics.applied(counts_of(result), seconds),
    )
    found = registry.receivers(settings, local={}) if receivers is None else receivers
    woken: list[int] = []
    app = create_app(
        db,
        found,
        metrics,
        max_body_bytes=max_body_bytes,
        on_stored=lambda: woken.append(1),
    )
    return Harness(db, TestClient(app), drainer, metrics, woken)
