"""Pure checks that isolate a malformed change before it reaches the database.

SQLite does not enforce column lengths and PostgreSQL rejects NUL characters; checking here
makes both dialects refuse the same records with the same reason. Constraint violations the
database itself reports (e.g. an email without '@') are isolated by the engine instead.
"""

from __future__ import annotations

from datetime import datetime

from db.tables import EMAIL_MAX, TEXT_MAX
from sync_worker.changes import ChangeKind, UserAttributes, UserChange

_STR_LIMITS = {
    "email": EMAIL_MAX,
    "name": TEXT_MAX,
    "given_name": TEXT_MAX,
    "family_name": TEXT_MAX,
    "phone": 64,
    "avatar_url": 65_536,
    "role": 64,
    "tenant_id": 255,
}
_DATETIMES = ("last_login_at", "created_at")


def problem(change: UserChange) -> str | None:
    """Why this change cannot be applied, or None if it looks well-formed."""
    if not isinstance(change.external_id, str) or not change.external_id:
        return "external_id: missing"
    if len(change.external_id) > 255:
        return "external_id: longer than 255 characters"
    if change.version is not None and not _aware(change.version):
        return "version: not a timezone-aware datetime"
    if change.kind is ChangeKind.UPSERT:
        if change.attributes is None:
            return "attributes: missing on an upsert"
        return _attributes_problem(change.attributes) or _linked_problem(change)
    # A login without a session is a sign-in event that names none (Auth.js signIn): it
    # moves the user's last_login_at only.
    return None


def _attributes_problem(attrs: UserAttributes) -> str | None:
    for name, limit in _STR_LIMITS.items():
        value = getattr(attrs, name)
        if value is None:
            continue
        if not isinstance(value, str):
            return f"{name}: expected a string, got {type(value).__name__}"
        if len(value) > limit:
            return f"{name}: longer than {limit} characters"
        if "\x00" in value:
            return f"{name}: contains a NUL character"
    for name in ("email_verified", "blocked"):
        if not isinstance(getattr(attrs, name), bool):
            return f"{name}: expected a boolean"
    for name in _DATETIMES:
        value = getattr(attrs, name)
        if value is not None and not _aware(value):
            return f"{name}: not a timezone-aware datetime"
    return None


def _linked_problem(change: UserChange) -> str | None:
    for identity in change.linked:
        if not identity.external_id or len(identity.external_id) > 255:
            return f"linked identity {identity.provider}: bad external_id"
    return None


def _aware(value: object) -> bool:
    return isinstance(value, datetime) and value.tzinfo is not None
