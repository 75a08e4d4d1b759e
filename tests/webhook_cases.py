"""Helpers of the webhook tests: fixture tables, real signatures, and checks of Work."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from standardwebhooks.webhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from providers.webhook import InboxItem, Work
from sync_worker.changes import UserChange

DATA = Path(__file__).parent / "data"


def new_secret() -> str:
    """A fresh signing secret in the ``whsec_<base64>`` form Svix and Auth.js apps use."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def cases(provider: str) -> list[Path]:
    return sorted((DATA / provider / "webhooks").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def encode(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def svix_headers(secret: str, msg_id: str, when: datetime, body: bytes) -> dict[str, str]:
    """Headers as Svix sends them, signed by the real ``svix`` package."""
    signature = SvixWebhook(secret).sign(msg_id, when, body.decode())
    return {
        "svix-id": msg_id,
        "svix-timestamp": str(int(when.timestamp())),
        "svix-signature": signature,
    }


def standard_headers(secret: str, msg_id: str, when: datetime, body: bytes) -> dict[str, str]:
    """Headers as a Standard Webhooks sender sends them, signed by ``standardwebhooks``."""
    signature = StandardWebhook(secret).sign(msg_id, when, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signature,
    }


def check_item(item: InboxItem, expected: Mapping[str, Any]) -> None:
    assert item.event_type == expected["event_type"]
    assert item.ignored is expected["ignored"]
    if "event_id" in expected:
        assert item.event_id == expected["event_id"]
    if "occurred_at" in expected:
        assert item.occurred_at == datetime.fromisoformat(expected["occurred_at"])
    stored = json.dumps(item.payload, ensure_ascii=False)
    json.loads(stored)  # JSON-able, as the inbox stores it
    for text in expected.get("stored_absent", ()):
        assert text not in stored


def check_work(work: Work, expected: Mapping[str, Any], *, received_at: datetime) -> None:
    assert list(work.fetch) == expected["fetch"]
    assert len(work.changes) == len(expected["changes"])
    for change, want in zip(work.changes, expected["changes"], strict=True):
        check_change(change, want, received_at=received_at)


def check_change(change: UserChange, want: Mapping[str, Any], *, received_at: datetime) -> None:
    assert change.kind.value == want["kind"]
    assert change.external_id == want["external_id"]
    if "version" in want:
        assert change.version == when(want["version"], received_at)
    if "attributes" in want:
        assert change.attributes is not None
        for name, value in want["attributes"].items():
            assert plain(getattr(change.attributes, name)) == value, name
    if "linked" in want:
        linked = sorted([i.provider, i.external_id] for i in change.linked)
        assert linked == sorted(want["linked"])
    if "session" in want and want["session"] is None:
        assert change.session is None
    elif "session" in want:
        assert change.session is not None
        for name, value in want["session"].items():
            wanted = when(value, received_at) if name in _SESSION_TIMES else value
            assert getattr(change.session, name) == wanted, name


_SESSION_TIMES = frozenset({"created_at", "last_seen_at", "expires_at", "revoked_at"})


def when(value: object, received_at: datetime) -> datetime | None:
    """A timestamp of an expectation: ``"received_at"``, an ISO string or null."""
    if value == "received_at":
        return received_at
    return None if value is None else datetime.fromisoformat(str(value))


def plain(value: object) -> object:
    """An attribute as the JSON of an expectation spells it."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value
