"""Stack Auth (Hexclave) adapter: full listings of the server users API.

Stack exposes no ``updated_at`` (docs/idp/stack.md §2), so there is no incremental pull:
every pass lists every user (``include_anonymous=true``, which also includes restricted
users; §1 "Default filtering") and the engine finds changes by content hash, which leaves
out ``last_active_at_millis`` because it moves on every request a user makes. ``version``
is the UTC time the page was read.

Pagination is Stack's inclusive user-id cursor, ascending by ``signed_up_at`` then id. Each
page's Page carries ``{"next_cursor": id}`` so a killed pass resumes there; the last page is
``complete`` with ``{"completed_at": iso}``. A resumed pass, or one whose cursor user vanished
mid-pass (the backend then answers an empty page, §1), saw only part of the users: its last
page says ``partial_pass`` so nobody reconciles deletions from it.

Ascending order matters: the only backend reordering (an anonymous user upgrading gets
``signed_up_at = now``) moves a user to the end, where an ascending pass still meets it.

Teams become ``tenant_id``. Per pass, ``/teams`` and ``/team-member-profiles`` are read once
(neither is paginated, §4). The tenant is the user's selected team when it is not personal,
else their oldest non-personal membership. Stack marks personal teams in no way the API
shows, so a team is personal only when ``server_metadata[personal_team_metadata_key]`` is
true, the operator's flag that reference §4 recommends; the backend's naming of personal
teams ("<name>'s Team", "Personal Team") is a code detail, not documented, and collides with
real team names, so it is not used. The user's team ids go into ``raw["team_ids"]`` so a
membership change changes the content hash.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import quote

import requests
import structlog

from providers.base import Cursor, Page, RecordError
from providers.http import HttpClient, HttpPolicy, json_body
from sync_worker.changes import (
    ChangeKind,
    LinkedIdentity,
    UserAttributes,
    UserChange,
    parse_timestamp,
    utcnow,
)
from sync_worker.config import StackSettings
from sync_worker.errors import ConfigError, ProviderError, UpstreamDataError
from sync_worker.readahead import read_ahead
from sync_worker.runtime import collector_paused

__all__ = [
    "HASH_EXCLUDE",
    "PROVIDER",
    "TEAM_IDS_KEY",
    "StackProvider",
    "TeamDirectory",
    "is_personal_team",
    "pick_tenant",
    "to_change",
]

PROVIDER = "stack"
HASH_EXCLUDE = frozenset({"last_active_at_millis"})
TEAM_IDS_KEY = "team_ids"
#: The user fields a Stack record states (no separate names, phone or login time); with
#: the memberships read, the tenant too.
STATED = frozenset({"email", "email_verified", "name", "avatar_url", "blocked"})
_STATED_WITH_TENANT = STATED | {"tenant_id"}
API_PREFIX = "/api/v1"

log = structlog.get_logger(__name__)

#: Users pages requested ahead of the one being mapped and applied (each is a round trip).
LISTING_READ_AHEAD = 1


# -- pure mapping ----------------------------------------------------------------------


def to_change(
    raw: Mapping[str, Any],
    *,
    observed_at: datetime,
    team_ids: Sequence[str] | None = None,
    tenant_id: str | None = None,
) -> UserChange:
    """Map one server user object (reference §2) to an upsert; ValueError if unusable.

    ``team_ids`` (the user's memberships) is stored in ``raw`` under ``team_ids``, sorted,
    so that membership changes change the content hash; None leaves ``raw`` as received.
    With the memberships known, ``tenant_id`` is stated even when None: a user who left
    every team loses the stored tenant. Without them the stored tenant stays.
    """
    user_id = _require_id(raw)
    record = dict(raw)
    if team_ids is not None:
        record[TEAM_IDS_KEY] = sorted(set(team_ids))
    return UserChange(
        provider=PROVIDER,
        external_id=user_id,
        kind=ChangeKind.UPSERT,
        version=observed_at,
        attributes=_attributes(raw, tenant_id, stated=team_ids is not None),
        linked=_linked(raw.get("oauth_providers")),
        raw=record,
        hash_exclude=HASH_EXCLUDE,
    )


def _attributes(raw: Mapping[str, Any], tenant_id: str | None, *, stated: bool) -> UserAttributes:
    return UserAttributes(
        email=_text(raw.get("primary_email")),
        email_verified=raw.get("primary_email_verified") is True,
        name=_text(raw.get("display_name")),
        avatar_url=_text(raw.get("profile_image_url")),
        role=_text(_mapping(raw.get("server_metadata")).get("role")),
        tenant_id=tenant_id,
        blocked=raw.get("restricted_by_admin") is True,
        created_at=parse_timestamp(raw.get("signed_up_at_millis")),
        profile=_profile(raw.get("client_metadata")),
        stated=_STATED_WITH_TENANT if stated else STATED,
    )


def _require_id(raw: Mapping[str, Any]) -> str:
    user_id = raw.get("id")
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user without a string id: {user_id!r}")
    return user_id


def _linked(providers: object) -> tuple[LinkedIdentity, ...]:
    if providers is None:
        return ()
    if not isinstance(providers, list):
        raise ValueError("oauth_providers is not a list")
    return tuple(_identity(p) for p in providers)


def _identity(entry: object) -> LinkedIdentity:
    if not isinstance(entry, Mapping):
        raise ValueError("oauth_providers entry is not an object")
    provider_id, account_id = entry.get("id"), entry.get("account_id")
    if not isinstance(provider_id, str) or not provider_id:
        raise ValueError(f"oauth provider without an id: {provider_id!r}")
    if not isinstance(account_id, str | int) or isinstance(account_id, bool) or account_id == "":
        raise ValueError(f"oauth provider {provider_id} without an account_id")
    email = entry.get("email")
    return LinkedIdentity(
        provider=f"{PROVIDER}:{provider_id}",
        external_id=str(account_id),
        email=email if isinstance(email, str) else None,
    )


def _profile(client_metadata: object) -> dict[str, str]:
    """locale and timezone from client metadata; it is user-writable JSON, so check types."""
    metadata = _mapping(client_metadata)
    keys = ("locale", "timezone")
    return {k: v for k in keys if isinstance(v := metadata.get(k), str) and v.strip()}


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value != "" else None


# -- pure team rules -------------------------------------------------------------------


def is_personal_team(team: Mapping[str, Any], metadata_key: str) -> bool:
    """True when the operator flagged the team personal in its server metadata."""
    return _mapping(team.get("server_metadata")).get(metadata_key) is True


def pick_tenant(
    selected_team_id: str | None, team_ids: Sequence[str], personal: Collection[str]
) -> str | None:
    """The selected team unless personal, else the oldest non-personal membership.

    ``team_ids`` is in membership order, oldest first. A selected team missing from it
    (joined after the memberships were read) still counts: the user row is the fresher fact.
    """
    if selected_team_id and selected_team_id not in personal:
        return selected_team_id
    return next((t for t in team_ids if t not in personal), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class TeamDirectory:
    """Memberships and personal teams read once per pass; maps a user to tenant and teams."""

    memberships: Mapping[str, tuple[str, ...]]
    personal: frozenset[str]
    metadata_key: str
    include_personal: bool

    @classmethod
    def build(
        cls,
        teams: Sequence[Mapping[str, Any]],
        profiles: Sequence[Mapping[str, Any]],
        *,
        metadata_key: str,
        include_personal: bool,
    ) -> TeamDirectory:
        """From ``/teams`` items and ``/team-member-profiles`` items (oldest membership first)."""
        personal = frozenset(str(t["id"]) for t in teams if is_personal_team(t, metadata_key))
        memberships: dict[str, list[str]] = {}
        for item in profiles:
            memberships.setdefault(str(item["user_id"]), []).append(str(item["team_id"]))
        return cls(
            memberships={k: tuple(v) for k, v in memberships.items()},
            personal=personal,
            metadata_key=metadata_key,
            include_personal=include_personal,
        )

    def team_ids(self, user_id: str) -> tuple[str, ...]:
        return self.memberships.get(user_id, ())

    def tenant(self, raw: Mapping[str, Any]) -> str | None:
        selected = _text(raw.get("selected_team_id"))
        team_ids = self.team_ids(str(raw.get("id")))
        if self.include_personal:
            return pick_tenant(selected, team_ids, frozenset())
        personal = self.personal
        # The embedded selected team may be newer than the /teams snapshot.
        if is_personal_team(_mapping(raw.get("selected_team")), self.metadata_key) and selected:
            personal = personal | {selected}
        return pick_tenant(selected, team_ids, personal)

    def change(self, raw: Mapping[str, Any], observed_at: datetime) -> UserChange:
        user_id = _require_id(raw)
        return to_change(
            raw,
            observed_at=observed_at,
            team_ids=self.team_ids(user_id),
            tenant_id=self.tenant(raw),
        )


# -- the adapter -----------------------------------------------------------------------


class StackProvider:
    """Pulls Stack Auth users over the server REST API (see the module docstring)."""

    name = PROVIDER

    def __init__(
        self,
        settings: StackSettings,
        *,
        policy: HttpPolicy | None = None,
        batch_size: int = 500,
        now: Callable[[], datetime] = utcnow,
        listing_read_ahead: int = LISTING_READ_AHEAD,
    ) -> None:
        missing = settings.missing_for_pull()
        if missing:
            raise ConfigError(f"providers.stack.{missing[0]} is required to pull from Stack")
        self._settings = settings
        self._batch_size = max(1, batch_size)
        self._now = now
        self._listing_read_ahead = listing_read_ahead
        self._http = HttpClient(
            _api_url(settings.base_url),
            provider=PROVIDER,
            policy=policy or HttpPolicy.from_settings(settings.http),
            headers=server_headers(settings),
        )

    # -- Provider protocol -------------------------------------------------------------

    def iter_changes(self, cursor: Cursor | None, *, full: bool = False) -> Iterator[Page]:
        """List every user; resume from ``cursor["next_cursor"]`` unless ``full``."""
        start = None if full or cursor is None else cursor.get("next_cursor")
        if start is not None and not isinstance(start, str):
            log.warning("stack_cursor_ignored", provider=PROVIDER, reason="not a string")
            start = None
        teams = self._http.get_json("teams")
        directory = self._directory(teams, self._http.get_json("team-member-profiles"))
        yield from self._pass(start, directory)

    def cursor_since(self, since: datetime) -> Cursor | None:
        return None  # no change log: every pull lists all users

    def fetch_user(self, external_id: str) -> UserChange | None:
        """GET /users/{id} plus its memberships; None when Stack says USER_NOT_FOUND."""
        if not _is_uuid(external_id):
            return None
        raw = self._get_or_none(f"users/{quote(external_id)}", None)
        if raw is None:
            return None
        params = {"user_id": external_id}
        teams = self._get_or_none("teams", params)
        profiles = self._get_or_none("team-member-profiles", params)
        if teams is None or profiles is None:
            return None  # deleted between the reads
        try:
            return self._directory(teams, profiles).change(raw, self._now())
        except (ValueError, TypeError, KeyError) as exc:
            raise UpstreamDataError(f"stack: user {external_id}: {exc}") from exc

    def close(self) -> None:
        self._http.close()

    @property
    def http(self) -> HttpClient:
        """The HTTP client (for its ``stats``)."""
        return self._http

    # -- listing -----------------------------------------------------------------------

    def _pass(self, start: str | None, directory: TeamDirectory) -> Iterator[Page]:
        partial = start is not None
        # Mapped in the reader thread too: while the engine waits on the database (a COPY,
        # a commit), the next page is parsed and mapped instead of after it.
        mapped = ((listed, _mapped(listed, directory)) for listed in self._listing(start))
        for listed, (changes, errors, seen) in read_ahead(mapped, self._listing_read_ahead):
            position, next_cursor = listed.position, listed.next_cursor
            if position is not None and not listed.items:
                # The cursor user is gone (deleted mid-pass): the rest of this pass is lost.
                log.warning("stack_cursor_vanished", provider=PROVIDER, cursor=position)
                partial = True
            if next_cursor is None:
                cursor = {"completed_at": listed.observed.isoformat()}
                yield from self._chunks(
                    changes, errors, seen, cursor, complete=True, partial_pass=partial
                )
                return
            if next_cursor == position:
                raise UpstreamDataError(f"stack: pagination did not advance past {position}")
            yield from self._chunks(
                changes, errors, seen, {"next_cursor": next_cursor}, complete=False
            )

    def _listing(self, start: str | None) -> Iterator[_Listed]:
        """The users pages as listed, one HTTP request each, until the cursor runs out (or
        stops moving: ``_pass`` raises on that)."""
        position = start
        while True:
            items, next_cursor = _parse_list(self._http.get_json("users", self._params(position)))
            yield _Listed(items, position, next_cursor, self._now())
            if next_cursor is None or next_cursor == position:
                return
            position = next_cursor

    def _params(self, position: str | None) -> dict[str, str | int]:
        params: dict[str, str | int] = {
            "limit": self._settings.page_size,
            "order_by": "signed_up_at",
            "desc": "false",
            "include_anonymous": "true",
        }
        if position is not None:
            params["cursor"] = position
        return params

    def _chunks(
        self,
        changes: Sequence[UserChange],
        errors: tuple[RecordError, ...],
        seen: tuple[str, ...],
        cursor: Cursor,
        *,
        complete: bool,
        partial_pass: bool = False,
    ) -> Iterator[Page]:
        """Split one HTTP page into batches; only the last is resumable, so carries the cursor."""
        size = self._batch_size
        starts = range(0, max(len(changes), 1), size)
        for n, offset in enumerate(starts, start=1):
            batch = tuple(changes[offset : offset + size])
            if n < len(starts):
                yield Page(changes=batch, cursor=None)
                continue
            yield Page(
                changes=batch,
                cursor=cursor,
                errors=errors,
                seen_ids=seen,
                complete=complete,
                partial_pass=partial_pass,
            )

    # -- teams -------------------------------------------------------------------------

    def _directory(self, teams: object, profiles: object) -> TeamDirectory:
        """The directory from ``/teams`` and ``/team-member-profiles`` bodies."""
        try:
            return TeamDirectory.build(
                _items(teams, "teams"),
                _items(profiles, "team-member-profiles"),
                metadata_key=self._settings.personal_team_metadata_key,
                include_personal=self._settings.include_personal_teams,
            )
        except (KeyError, TypeError) as exc:
            raise UpstreamDataError(f"stack: malformed teams or memberships: {exc}") from exc

    def _get_or_none(self, path: str, params: Mapping[str, str] | None) -> Any:
        """GET JSON; None only for a 404 that Stack marks USER_NOT_FOUND."""
        response = self._http.request("GET", path, params=params, ok=(200, 404))
        if response.status_code == 404:
            if _known_error(response) == "USER_NOT_FOUND":
                return None
            # Any other 404 (a wrong base URL, say) must not read as "the user is gone".
            raise ProviderError(f"stack: GET {path}: HTTP 404 ({_known_error(response)})")
        try:
            return json_body(response)
        except ValueError as exc:
            raise UpstreamDataError(f"stack: GET {path}: invalid JSON") from exc


# -- helpers ---------------------------------------------------------------------------


def server_headers(settings: StackSettings) -> dict[str, str]:
    """The three server-access headers under the configured prefix (x-stack / x-hexclave)."""
    prefix = settings.header_prefix.rstrip("-")
    return {
        f"{prefix}-access-type": "server",
        f"{prefix}-project-id": settings.project_id or "",
        f"{prefix}-secret-server-key": settings.secret_server_key or "",
    }


def _api_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith(API_PREFIX) else base + API_PREFIX


class _Listed(NamedTuple):
    """One users page as it came: its items, the cursor that asked for it, the next cursor
    and when it was read (the version of every change mapped from it)."""

    items: list[Any]
    position: str | None
    next_cursor: str | None
    observed: datetime


def _parse_list(body: object) -> tuple[list[Any], str | None]:
    """The list envelope; anything else is an UpstreamDataError (never a silent last page)."""
    if not isinstance(body, Mapping) or not isinstance(body.get("items"), list):
        raise UpstreamDataError("stack: users page without an items list")
    pagination = body.get("pagination")
    if not isinstance(pagination, Mapping):
        raise UpstreamDataError("stack: users page without pagination")
    next_cursor = pagination.get("next_cursor")
    if next_cursor is not None and not isinstance(next_cursor, str):
        raise UpstreamDataError(f"stack: bad next_cursor {next_cursor!r}")
    return body["items"], next_cursor


def _items(body: object, what: str) -> list[Mapping[str, Any]]:
    if not isinstance(body, Mapping) or not isinstance(body.get("items"), list):
        raise UpstreamDataError(f"stack: {what} response without an items list")
    return [i for i in body["items"] if isinstance(i, Mapping)]


def _mapped(
    listed: _Listed, directory: TeamDirectory
) -> tuple[list[UserChange], tuple[RecordError, ...], tuple[str, ...]]:
    with collector_paused():  # the page's changes all live until it is applied
        return _map_page(listed.items, directory, listed.observed)


def _map_page(
    items: Sequence[Any], directory: TeamDirectory, observed_at: datetime
) -> tuple[list[UserChange], tuple[RecordError, ...], tuple[str, ...]]:
    """Map each item; a bad one becomes a RecordError, but its id still counts as seen."""
    changes: list[UserChange] = []
    errors: list[RecordError] = []
    seen: list[str] = []
    for item in items:
        raw = item if isinstance(item, Mapping) else None
        user_id = raw.get("id") if raw is not None else None
        if isinstance(user_id, str) and user_id:
            seen.append(user_id)
        try:
            if raw is None:
                raise ValueError("user item is not an object")
            changes.append(directory.change(raw, observed_at))
        except (ValueError, TypeError, KeyError) as exc:
            external_id = user_id if isinstance(user_id, str) else None
            errors.append(RecordError(external_id=external_id, reason=str(exc), raw=raw))
    return changes, tuple(errors), tuple(seen)


def _known_error(response: requests.Response) -> str | None:
    code = response.headers.get("X-Stack-Known-Error")
    if code:
        return code
    try:
        body = json_body(response)
    except ValueError:
        return None
    return body.get("code") if isinstance(body, Mapping) else None


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
