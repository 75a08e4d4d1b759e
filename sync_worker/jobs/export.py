"""Everything stored about one person, for a data-access request (``export-user``).

``export_user`` selects one person by email, user id or identity, reads every row about
them in one snapshot (``db.export``) and returns a JSON-ready document:

    {"export": {"generated_at", "selected_by"}, "user": {...}, "profile": {...} | null,
     "identities": [...], "sessions": [...], "audit": [...], "inbox": [...]}

Identities include the linked ones (one person may sign in through several) with their raw
upstream records; sessions are stored by id only (Auth.js tokens as their SHA-256), so no
credential can appear. ``inbox`` holds the webhook deliveries still stored (done ones for
``retention.inbox_done``, failed and dead ones until replayed) that are about one of the
person's identities: those whose payload names it, decoded as the drainer decodes them (a
payload that no longer decodes is kept if it holds the id at all). ``render_json`` and
``render_csv`` turn the document into bytes.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import structlog
from sqlalchemy import Connection, Engine

from db import export as store
from providers.webhook import WorkDecoder
from sync_worker.changes import utcnow
from sync_worker.errors import SyncWorkerError, WebhookPayloadError

__all__ = [
    "CSV_COLUMNS",
    "SECTIONS",
    "AmbiguousUser",
    "Selector",
    "UserNotFound",
    "counts",
    "export_user",
    "identity_keys",
    "render_csv",
    "render_json",
]

SECTIONS = ("user", "profile", "identities", "sessions", "audit", "inbox")
CSV_COLUMNS = ("section", "record", "field", "value")
# A cell starting with one of these is a formula to a spreadsheet (CSV injection): a name
# such as "=HYPERLINK(...)" must stay text in the officer's spreadsheet.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

log = structlog.get_logger(__name__)


class UserNotFound(SyncWorkerError):
    """No user matches the selector (exit 1)."""


class AmbiguousUser(SyncWorkerError):
    """An email matches several users; the operator must choose one by id (exit 2)."""

    def __init__(self, message: str, count: int) -> None:
        super().__init__(message)
        self.count = count


@dataclass(frozen=True, slots=True, kw_only=True)
class Selector:
    """Exactly one of: ``email`` (any case), ``user_id``, ``external`` (``PROVIDER:ID``).

    Provider names may hold a colon themselves (``authjs:github:1234``), so ``external``
    is kept whole and every split of it is tried against the stored identities.
    """

    email: str | None = None
    user_id: uuid.UUID | None = None
    external: str | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.email, self.user_id, self.external) if v is not None]
        if len(given) != 1:
            raise ValueError("select a person by exactly one of email, user_id, external")
        if self.email is not None and not self.email.strip():
            raise ValueError("email: empty")
        if self.external is not None and not identity_keys(self.external):
            raise ValueError("external: expected PROVIDER:ID")

    @property
    def kind(self) -> str:
        if self.email is not None:
            return "email"
        return "id" if self.user_id is not None else "external"


def identity_keys(external: str) -> list[tuple[str, str]]:
    """Every (provider, external id) reading of ``PROVIDER:ID``, split at each colon."""
    parts = external.split(":")
    keys = [(":".join(parts[:i]), ":".join(parts[i:])) for i in range(1, len(parts))]
    return [(p, e) for p, e in keys if p and e]


def export_user(
    db: Engine, selector: Selector, decoders: Mapping[str, WorkDecoder]
) -> dict[str, Any]:
    """The export document of the one person ``selector`` names.

    ``decoders`` (``providers.registry.decoders``) tell which inbox deliveries are about the
    person. Raises UserNotFound, or AmbiguousUser when an email matches several users (never
    a guess: the operator picks one with ``--id``). A soft-deleted user is still exported:
    their rows are still stored.
    """
    with store.snapshot(db) as conn:
        user_id = _resolve(conn, selector)
        found = store.person(conn, user_id)
        keys = {(i["provider"], i["external_id"]) for i in found["identities"]}
        found["inbox"] = [
            row for row in store.inbox_mentioning(conn, sorted(keys)) if _about(row, keys, decoders)
        ]
    log.info("user_exported", user_id=str(user_id), selected_by=selector.kind)  # id, no email
    document: dict[str, Any] = {
        "export": {"generated_at": utcnow().isoformat(), "selected_by": selector.kind}
    }
    document.update({section: _plain(found[section]) for section in SECTIONS})
    return document


def _about(
    row: Mapping[str, Any], keys: set[tuple[str, str]], decoders: Mapping[str, WorkDecoder]
) -> bool:
    """Whether an inbox row's payload is about one of ``keys`` (its changes, or the users it
    asks to re-read); a payload that does not decode any more counts (it holds the id)."""
    provider = row["provider"]
    decoder = decoders.get(provider)
    if decoder is None:
        return True
    try:
        work = decoder.to_work(
            row["payload"], event_id=row["event_id"], received_at=row["received_at"]
        )
    except WebhookPayloadError:
        return True
    named = {(c.provider, c.external_id) for c in work.changes}
    named.update((provider, e) for e in work.fetch)
    return not named.isdisjoint(keys)


def _resolve(conn: Connection, selector: Selector) -> uuid.UUID:
    if selector.email is not None:
        found = store.users_by_email(conn, selector.email.strip())
    elif selector.user_id is not None:
        found = store.users_by_id(conn, selector.user_id)
    else:
        assert selector.external is not None
        found = store.users_by_identity(conn, identity_keys(selector.external))
    if not found:
        raise UserNotFound(f"no user matches the --{selector.kind} given")
    if len(found) > 1:
        message = f"the --{selector.kind} given matches {len(found)} users; choose one with --id"
        raise AmbiguousUser(message, len(found))
    return found[0]


def counts(document: Mapping[str, Any]) -> dict[str, int]:
    """Rows per section, for the run's record (no personal data)."""
    return {
        section: len(value) if isinstance(value, list) else int(value is not None)
        for section, value in document.items()
        if section in SECTIONS
    }


# -- rendering ----------------------------------------------------------------------------


def render_json(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()


def render_csv(document: Mapping[str, Any]) -> bytes:
    """One row per stored value: section, record (1, 2, ... within the section), field,
    value. Nested values (raw upstream records, settings, audit changes) are spread over
    dotted fields (``raw.email``, ``changes.email.1``; list items numbered from 0, an audit
    change being [old, new]); an empty cell is a null. UTF-8 with a byte-order mark, which
    spreadsheet programs need to read accents right; cells that a spreadsheet would take for
    a formula start with an apostrophe."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for section, record, field, value in csv_rows(document):
        writer.writerow((section, record, field, _cell(value)))
    return ("\ufeff" + out.getvalue()).encode()


def csv_rows(document: Mapping[str, Any]) -> Iterator[tuple[str, int, str, Any]]:
    for section, value in document.items():
        records = value if isinstance(value, list) else [] if value is None else [value]
        for number, record in enumerate(records, start=1):
            for field, leaf in _leaves("", record):
                yield section, number, field, leaf


def _leaves(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            yield from _leaves(f"{prefix}.{key}" if prefix else str(key), item)
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            yield from _leaves(f"{prefix}.{index}", item)
    else:
        yield prefix, value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict | list):
        text = json.dumps(value)  # only empty ones reach here
    else:
        text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _plain(value: Any) -> Any:
    """Rows as JSON values: ids as text, times in ISO 8601 (UTC)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value
