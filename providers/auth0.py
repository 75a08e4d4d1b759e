"""Auth0 adapter: full sync by user-export job, deltas from the logs API.

Full sync (``full=True`` or no ``log_id`` in the cursor)::

    newest log_id  ->  POST /jobs/users-exports  ->  poll GET /jobs/{id}  ->  stream the
    gzipped NDJSON from ``location``  ->  pages of ``batch_size`` (cursor None), then an empty
    page, complete=True, with cursor {"log_id": <newest log_id read before the export>}

The log position is read *before* the export starts, so the next incremental pull overlaps
the export instead of leaving a gap. ``GET /users`` is never paged (1,000-result cap,
eventually consistent).

Incremental (cursor ``{"log_id": ...}``): ``GET /logs?from=&take=`` following
``Link: rel="next"`` until an empty page. Each logs page becomes one ``Page`` whose cursor is
its last ``log_id``: lifecycle codes re-read the user (``GET /users/{id}``, immediately
consistent; 404 means deleted), ``sdu`` and ``sapi`` DELETEs are deletions, ``s`` is a login.
"""

from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import orjson
import requests
import structlog
import urllib3
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session

from providers.base import Cursor, Page, Provider, RecordError
from providers.fields import optional_text
from providers.http import HttpClient, HttpPolicy, HttpStatusError, json_body
from sync_worker.changes import (
    ChangeKind,
    LinkedIdentity,
    SessionInfo,
    UserAttributes,
    UserChange,
    parse_timestamp,
)
from sync_worker.config import Auth0Settings
from sync_worker.errors import (
    ConfigError,
    ProviderAuthError,
    ProviderError,
    UpstreamDataError,
    UpstreamUnavailable,
)
from sync_worker.readahead import read_ahead
from sync_worker.runtime import collector_paused

__all__ = ["EXPORT_FIELDS", "Auth0Provider", "LogPlan", "plan_logs", "to_change"]

PROVIDER = "auth0"
EXPORT_FIELDS = (
    "user_id",
    "email",
    "email_verified",
    "name",
    "given_name",
    "family_name",
    "nickname",
    "picture",
    "phone_number",
    "user_metadata",
    "app_metadata",
    "identities",
    "created_at",
    "updated_at",
    "last_login",
    "blocked",
)
# Log codes after which the user's profile may differ: re-read the user.
FETCH_CODES = frozenset({"ss", "sce", "scu", "scpn", "sv", "sscim"})
# Codes that change a user without a per-user trace (bulk import): a full sync catches them.
JOB_CODES = frozenset({"sui"})
# Fields that move on every login without the person changing; kept out of the content hash.
_VOLATILE = frozenset({"last_login", "last_ip", "logins_count", "updated_at"})
_IDP_SECRETS = frozenset({"access_token", "refresh_token", "access_token_secret"})
_USERS_PATH = "/api/v2/users"
_SESSION_ID_MAX = 255  # user_sessions.external_session_id
# Export polling without a time_left_seconds hint overshoots completion by up to this much;
# 15 s keeps that small, and a job of hours still costs only 4 polls a minute.
_POLL_MAX_INTERVAL = 15.0
_POLL_BACKOFF = 1.5
_BROKEN_STREAM = (
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    urllib3.exceptions.ProtocolError,
    requests.exceptions.ChunkedEncodingError,
)

log = structlog.get_logger(__name__, provider=PROVIDER)  # lazy: bound only once configured


# -- pure mapping -------------------------------------------------------------------------


def to_change(raw: Mapping[str, Any]) -> UserChange:
    """Map one Auth0 user object (API or export line) to an UPSERT; ValueError if unusable."""
    user_id = raw.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("user_id: missing or not a string")
    return UserChange(
        provider=PROVIDER,
        external_id=user_id,
        kind=ChangeKind.UPSERT,
        version=parse_timestamp(raw.get("updated_at")),
        attributes=_attributes(raw),
        linked=_linked(user_id, raw.get("identities")),
        raw=_without_idp_secrets(raw),
        hash_exclude=_VOLATILE,
    )


def _attributes(raw: Mapping[str, Any]) -> UserAttributes:
    app = _object(raw, "app_metadata")
    meta = _object(raw, "user_metadata")
    return UserAttributes(
        email=optional_text(raw, "email"),
        # Some enterprise connections send the flag as a string.
        email_verified=raw.get("email_verified") in (True, "true"),
        name=optional_text(raw, "name"),
        given_name=optional_text(raw, "given_name"),
        family_name=optional_text(raw, "family_name"),
        phone=optional_text(raw, "phone_number"),
        avatar_url=optional_text(raw, "picture"),
        role=_role(app),
        tenant_id=_scalar_text(app.get("tenant_id")),
        blocked=raw.get("blocked") is True,
        last_login_at=parse_timestamp(raw.get("last_login")),
        created_at=parse_timestamp(raw.get("created_at")),
        profile={k: meta[k] for k in ("locale", "timezone") if isinstance(meta.get(k), str)},
    )


def _linked(user_id: str, identities: object) -> tuple[LinkedIdentity, ...]:
    if identities is None:
        return ()
    if not isinstance(identities, list) or not all(isinstance(i, dict) for i in identities):
        raise ValueError("identities: expected a list of objects")
    if len(identities) < 2:  # most users: the one identity is the user itself
        return ()
    primary = next((i for i in identities if _identity_key(i) == user_id), identities[0])
    return tuple(_linked_identity(i) for i in identities if i is not primary)


def _linked_identity(identity: Mapping[str, Any]) -> LinkedIdentity:
    provider, external_id = identity.get("provider"), identity.get("user_id")
    if not isinstance(provider, str) or external_id in (None, ""):
        raise ValueError("identities: an identity lacks provider or user_id")
    profile = identity.get("profileData")
    email = profile.get("email") if isinstance(profile, dict) else None
    return LinkedIdentity(
        provider=f"{PROVIDER}:{provider}",
        external_id=str(external_id),
        email=email if isinstance(email, str) else None,
    )


def _identity_key(identity: Mapping[str, Any]) -> str:
    return f"{identity.get('provider')}|{identity.get('user_id')}"


def _role(app_metadata: Mapping[str, Any]) -> str | None:
    roles = app_metadata.get("roles")
    if isinstance(roles, list) and roles and isinstance(roles[0], str):
        return roles[0]
    role = app_metadata.get("role")
    return role if isinstance(role, str) and role else None


def _object(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key}: expected an object")
    return value


def _scalar_text(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _without_idp_secrets(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """The record as kept in the database: upstream IdP tokens never leave the adapter."""
    identities = raw.get("identities")
    if not isinstance(identities, list) or all(
        not isinstance(i, dict) or _IDP_SECRETS.isdisjoint(i) for i in identities
    ):
        return raw  # nothing to strip (the usual case): no copy
    return {
        **raw,
        "identities": [
            {k: v for k, v in i.items() if k not in _IDP_SECRETS} if isinstance(i, dict) else i
            for i in identities
        ],
    }


# -- pure log planning --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LogPlan:
    """What one page of logs asks for, per user, the last lifecycle event winning.

    ``fetch`` and ``delete`` map a user id to the log event behind it (insertion order);
    ``logins`` are the session events in order (``s`` logins, and ``slo`` logouts that name
    their session); ``skipped`` counts events of job-level codes.
    """

    fetch: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    delete: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    logins: tuple[Mapping[str, Any], ...] = ()
    skipped: int = 0


def plan_logs(logs: Iterable[Mapping[str, Any]]) -> LogPlan:
    """Decide which users a page of log events re-reads, deletes or logs in (pure)."""
    fetch: dict[str, Mapping[str, Any]] = {}
    delete: dict[str, Mapping[str, Any]] = {}
    logins: list[Mapping[str, Any]] = []
    skipped = 0
    for event in logs:
        action, user_id = _log_action(event)
        if action == "login":
            logins.append(event)
        elif action == "skip":
            skipped += 1
        elif action in ("fetch", "delete"):
            fetch.pop(user_id, None)
            delete.pop(user_id, None)
            (fetch if action == "fetch" else delete)[user_id] = event
    return LogPlan(fetch=fetch, delete=delete, logins=tuple(logins), skipped=skipped)


def _log_action(event: Mapping[str, Any]) -> tuple[str, str]:
    code, user_id = event.get("type"), event.get("user_id") or ""
    if not isinstance(code, str):  # a list or an object: unhashable, and no event we know
        return "ignore", ""
    if code == "sapi":
        return _api_action(event)
    if code in JOB_CODES:
        return "skip", ""
    if not isinstance(user_id, str) or not user_id:
        return "ignore", ""
    if code == "s" or (code == "slo" and _session_id(event) is not None):
        return "login", user_id  # a logout naming no session has nothing to revoke
    if code == "sdu":
        return "delete", user_id
    return ("fetch", user_id) if code in FETCH_CODES else ("ignore", "")


def _api_action(event: Mapping[str, Any]) -> tuple[str, str]:
    """A Management API write: its target user is in details.request, not in user_id."""
    details = _child(event, "details")
    request = _child(details, "request")
    path = unquote(urlsplit(str(request.get("path") or "")).path).rstrip("/")
    method = str(request.get("method") or "").upper()
    if path == _USERS_PATH and method == "POST":
        created = _child(_child(details, "response"), "body").get("user_id")
        return ("fetch", created) if isinstance(created, str) and created else ("ignore", "")
    if not path.startswith(_USERS_PATH + "/"):
        return "ignore", ""
    # The id itself may contain "|" but never "/": the first segment is the user.
    target, _, rest = path.removeprefix(_USERS_PATH + "/").partition("/")
    if method == "DELETE" and not rest:
        return "delete", target
    return "fetch", target


def _child(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def login_change(event: Mapping[str, Any]) -> UserChange:
    """A session event as a LOGIN change: a login (``s``), or a logout (``slo``) that revokes
    the session at its time.

    The session is Auth0's own, ``details.session_id``: the login that opened it, later
    logins riding on it (single sign-on) and the logout that ends it all name it. A log
    without one (older tenants) keys its login by ``log_id``, as before. ``ip`` and
    ``user_agent`` are the device's, as Auth0 saw it.
    """
    when = parse_timestamp(event.get("date"))
    log_id = str(event["log_id"])
    logout = event.get("type") == "slo"
    session = SessionInfo(
        external_session_id=_session_id(event) or log_id,
        created_at=None if logout else when,  # a logout does not say when the session began
        last_seen_at=when,
        revoked_at=when if logout else None,
        ip=event.get("ip") or None,
        user_agent=event.get("user_agent") or None,
    )
    return UserChange(
        provider=PROVIDER,
        external_id=str(event["user_id"]),
        kind=ChangeKind.LOGIN,
        version=when,
        session=session,
        event_id=log_id,
    )


def _session_id(event: Mapping[str, Any]) -> str | None:
    """Auth0's id of the session a log event belongs to, if it names one that fits."""
    value = _child(event, "details").get("session_id")
    return value if isinstance(value, str) and 0 < len(value) <= _SESSION_ID_MAX else None


def delete_change(user_id: str, event: Mapping[str, Any]) -> UserChange:
    return UserChange(
        provider=PROVIDER,
        external_id=user_id,
        kind=ChangeKind.DELETE,
        version=parse_timestamp(event.get("date")),
        event_id=str(event["log_id"]),
    )


# -- the token ----------------------------------------------------------------------------


class _ManagementToken:
    """The Management API token: a client-credentials grant by authlib, cached until
    shortly before it expires (a new token per request is Auth0's main cause of 429s)."""

    def __init__(
        self, http: HttpClient, settings: Auth0Settings, audience: str, clock: Callable[[], float]
    ) -> None:
        self._http, self._audience, self._clock = http, audience, clock
        self._timeout = (http.policy.connect_timeout, http.policy.read_timeout)
        self._url = http.base_url + "/oauth/token"
        self._oauth = OAuth2Session(
            settings.client_id,
            settings.client_secret,
            token_endpoint_auth_method="client_secret_post",  # noqa: S106 - a method name
        )
        # 429 and 5xx from the token endpoint become our retryable errors before authlib parses.
        self._oauth.register_compliance_hook("access_token_response", http.check_transient)
        self._value: str | None = None
        self._expires_at = 0.0

    def headers(self) -> Mapping[str, str]:
        if self._value is None or self._clock() >= self._expires_at:
            self._fetch()
        return {"Authorization": f"Bearer {self._value}"}

    def invalidate(self) -> None:
        self._value = None

    def close(self) -> None:
        self._oauth.close()

    def _fetch(self) -> None:
        token = self._http.call(self._grant, method="POST", path_or_url=self._url)
        try:
            value, expires_in = str(token["access_token"]), float(token.get("expires_in", 86400))
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamDataError("auth0: token response lacks access_token") from exc
        self._value = value
        self._expires_at = self._clock() + expires_in - min(60.0, expires_in / 10)
        log.info("auth0_token_issued", expires_in=expires_in)

    def _grant(self) -> Mapping[str, Any]:
        try:
            token: Mapping[str, Any] = self._oauth.fetch_token(
                self._url,
                grant_type="client_credentials",
                audience=self._audience,
                timeout=self._timeout,
            )
        except OAuthError as exc:
            raise ProviderAuthError(f"auth0: token request rejected ({exc.error})") from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise self._http.network_error("POST", self._url, exc) from exc
        except ValueError as exc:
            raise UpstreamDataError("auth0: token endpoint sent an unreadable answer") from exc
        return token


# -- the adapter --------------------------------------------------------------------------


class Auth0Provider:
    """Auth0 Management API adapter (see the module docstring)."""

    name = PROVIDER

    def __init__(
        self,
        settings: Auth0Settings,
        *,
        policy: HttpPolicy | None = None,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        base_url, audience = _endpoints(settings)
        self._settings = settings
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._sleep, self._clock = sleep, clock
        self._http = HttpClient(
            base_url,
            provider=PROVIDER,
            policy=policy or HttpPolicy.from_settings(settings.http),
            auth=self._auth_headers,
            on_unauthorized=self._reauthenticate,
            sleep=sleep,
            clock=clock,
        )
        self._token = _ManagementToken(self._http, settings, audience, clock)

    def _auth_headers(self) -> Mapping[str, str]:
        return self._token.headers()

    def _reauthenticate(self) -> None:
        self._token.invalidate()

    @property
    def http(self) -> HttpClient:
        return self._http

    def iter_changes(self, cursor: Cursor | None, *, full: bool = False) -> Iterator[Page]:
        log_id = (cursor or {}).get("log_id")
        if full or not log_id:
            return self._full_sync()  # one download, decoded in Python: no reader thread
        # Log pages wait on paced HTTP: the next one is read while this one is applied.
        return read_ahead(self._incremental(str(log_id)), 1)

    def cursor_since(self, since: datetime) -> Cursor:
        """The cursor that makes the next incremental pull start at ``since``.

        It is the newest log strictly before ``since`` (``from`` returns logs after it). With
        none, the tenant's retention starts later than ``since`` and events would be missed.
        """
        stamp = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        params = {
            "q": f"date:[* TO {stamp}}}",
            "sort": "date:-1",
            "page": 0,
            "per_page": 1,
            "fields": "log_id,date",
            "include_fields": "true",
        }
        logs = self._http.get_json("/api/v2/logs", params=params)
        if not isinstance(logs, list):
            raise UpstreamDataError("auth0: GET /api/v2/logs did not return a list")
        if not logs:
            raise ProviderError(
                f"auth0: no log older than {stamp} is retained; run a --full backfill instead"
            )
        return {"log_id": str(logs[0]["log_id"])}

    def fetch_user(self, external_id: str) -> UserChange | None:
        raw = self._get_user(external_id)
        if raw is None:
            return None
        try:
            return to_change(raw)
        except (ValueError, TypeError) as exc:
            raise UpstreamDataError(f"auth0: user cannot be mapped: {exc}") from exc

    def close(self) -> None:
        self._token.close()
        self._http.close()

    # -- full sync ----------------------------------------------------------------------

    def _full_sync(self) -> Iterator[Page]:
        newest = self._newest_log_id()
        created = self._http.request(
            "POST",
            "/api/v2/jobs/users-exports",
            json={"format": "json", "fields": [{"name": f} for f in EXPORT_FIELDS]},
            ok=(200, 201),
        )
        try:
            job_id = str(json_body(created)["id"])
        except (ValueError, TypeError, KeyError) as exc:
            raise UpstreamDataError("auth0: POST /api/v2/jobs/users-exports: no job id") from exc
        log.info("auth0_export_started", job_id=job_id, resume_log_id=newest)
        location = self._await_export(job_id)
        response = self._http.request("GET", location, stream=True)
        yield from self._export_pages(_export_records(response), {"log_id": newest})

    def _newest_log_id(self) -> str | None:
        params = {"sort": "date:-1", "page": 0, "per_page": 1, "fields": "log_id,date"}
        logs = self._http.get_json("/api/v2/logs", params={**params, "include_fields": "true"})
        if not isinstance(logs, list):
            raise UpstreamDataError("auth0: GET /api/v2/logs did not return a list")
        return str(logs[0]["log_id"]) if logs else None

    def _await_export(self, job_id: str) -> str:
        """Poll the job until it has a ``location``: sleep as long as the job says it needs
        (``time_left_seconds``), else back off by 1.5x; both within the poll bounds."""
        deadline = self._clock() + self._settings.export_poll_max_seconds
        ceiling = max(_POLL_MAX_INTERVAL, self._poll_interval)
        backoff = self._poll_interval
        while True:
            job = self._http.get_json(f"/api/v2/jobs/{quote(job_id, safe='')}")
            job = job if isinstance(job, dict) else {}
            status = job.get("status")
            if status == "completed" and job.get("location"):
                return str(job["location"])
            if status == "failed":
                raise UpstreamUnavailable(f"auth0: export job {job_id} failed")
            time_left = _non_negative(job.get("time_left_seconds"))
            if time_left is None:
                delay, backoff = backoff, min(backoff * _POLL_BACKOFF, ceiling)
            else:
                delay = min(max(time_left, self._poll_interval), ceiling)
            log.info(
                "auth0_export_poll",
                job_id=job_id,
                status=status if isinstance(status, str) else None,
                percentage_done=_non_negative(job.get("percentage_done")),
                time_left_seconds=time_left,
                sleep=round(delay, 3),
            )
            if self._clock() + delay > deadline:
                raise UpstreamUnavailable(f"auth0: export job {job_id} still {status} at deadline")
            self._sleep(delay)

    def _export_pages(
        self, records: Iterator[Mapping[str, Any] | RecordError], cursor: Cursor
    ) -> Iterator[Page]:
        while (page := self._next_export_page(records)) is not None:
            yield page
        log.info("auth0_export_read", resume_log_id=cursor.get("log_id"))
        # The log position is safe to resume from only once the whole file is read: it comes
        # on a page of its own rather than holding each decoded page back to see if it is last.
        yield Page(changes=(), cursor=cursor, complete=True)

    def _next_export_page(self, records: Iterator[Mapping[str, Any] | RecordError]) -> Page | None:
        # Every record decoded here lives until the page is applied: collections meanwhile
        # would only walk them again (measured: JSON decoding took twice as long).
        with collector_paused():
            chunk = list(islice(records, self._batch_size))
            return _records_page(chunk) if chunk else None

    # -- incremental ----------------------------------------------------------------------

    def _incremental(self, log_id: str) -> Iterator[Page]:
        take = self._settings.page_size
        url: str = "/api/v2/logs"
        params: Mapping[str, Any] | None = {"from": log_id, "take": take}
        while True:
            response = self._http.request("GET", url, params=params)
            logs = _log_list(response)
            if not logs:
                return
            yield self._logs_page(logs)
            # After the first request Auth0 wants its Link next URL followed, not rebuilt.
            next_url = response.links.get("next", {}).get("url")
            if next_url:
                url, params = _same_origin(next_url), None
            else:
                params = {"from": logs[-1]["log_id"], "take": take}

    def _logs_page(self, logs: list[Mapping[str, Any]]) -> Page:
        plan = plan_logs(logs)
        if plan.skipped:
            log.warning("auth0_bulk_job_logged", count=plan.skipped, hint="run a full sync")
        upserts, errors, seen, gone = self._fetch_planned(plan.fetch)
        logins = [login_change(event) for event in plan.logins]
        deletes = [delete_change(uid, event) for uid, event in {**plan.delete, **gone}.items()]
        return Page(
            changes=(*upserts, *logins, *deletes),
            cursor={"log_id": str(logs[-1]["log_id"])},
            errors=tuple(errors),
            seen_ids=tuple(seen),
        )

    def _fetch_planned(
        self, planned: Mapping[str, Mapping[str, Any]]
    ) -> tuple[list[UserChange], list[RecordError], list[str], dict[str, Mapping[str, Any]]]:
        upserts: list[UserChange] = []
        errors: list[RecordError] = []
        seen: list[str] = []
        gone: dict[str, Mapping[str, Any]] = {}
        for user_id, event in planned.items():
            try:
                raw = self._get_user(user_id)
            except HttpStatusError as exc:
                errors.append(RecordError(external_id=user_id, reason=str(exc)))
                continue
            if raw is None:
                gone[user_id] = event
                continue
            seen.append(user_id)
            item = _map_record(raw)
            if isinstance(item, RecordError):
                errors.append(item)
            else:
                upserts.append(replace(item, event_id=str(event["log_id"])))
        return upserts, errors, seen, gone

    def _get_user(self, user_id: str) -> Mapping[str, Any] | None:
        response = self._http.request(
            "GET", f"{_USERS_PATH}/{quote(user_id, safe='')}", ok=(200, 404)
        )
        if response.status_code == 404:
            return None
        try:
            raw = json_body(response)
        except ValueError as exc:
            raise UpstreamDataError("auth0: GET /api/v2/users/{id}: invalid JSON") from exc
        if not isinstance(raw, dict):
            raise UpstreamDataError("auth0: GET /api/v2/users/{id}: not an object")
        return raw


if TYPE_CHECKING:
    _conforms: type[Provider] = Auth0Provider


def _endpoints(settings: Auth0Settings) -> tuple[str, str]:
    """Base URL and token audience; the audience names the tenant domain when there is one."""
    missing = settings.missing_for_pull()
    if missing:
        raise ConfigError(f"providers.auth0.{missing[0]}: missing")
    domain = (settings.domain or "").removeprefix("https://").rstrip("/")
    base_url = (settings.base_url or f"https://{domain}").rstrip("/")
    audience = settings.audience or (
        f"https://{domain}/api/v2/" if domain else f"{base_url}/api/v2/"
    )
    return base_url, audience


def _non_negative(value: object) -> float | None:
    """A non-negative JSON number, else None (a bool is not a number; NaN fails >= 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return None
    return float(value)


def _same_origin(link: str) -> str:
    """A Link URL's path and query, so it is sent to our base URL (with its credentials)
    even when the tenant names its public domain and we reach it through ``base_url``."""
    split = urlsplit(link)
    return f"{split.path}?{split.query}" if split.query else split.path


def _export_records(response: requests.Response) -> Iterator[Mapping[str, Any] | RecordError]:
    """Stream the gzipped NDJSON export line by line; never hold the file in memory."""
    raw = response.raw
    raw.decode_content = False  # the file itself is gzip, whatever the transport says
    try:
        with response, gzip.GzipFile(fileobj=raw) as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield _parse_line(number, line)
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise UpstreamUnavailable("auth0: export download timed out") from exc
    except _BROKEN_STREAM as exc:
        raise UpstreamDataError(f"auth0: export download truncated or corrupt: {exc}") from exc


def _parse_line(number: int, line: bytes) -> Mapping[str, Any] | RecordError:
    try:
        record = orjson.loads(line)
    except ValueError:
        return RecordError(external_id=None, reason=f"export line {number}: invalid JSON")
    if not isinstance(record, dict):
        return RecordError(external_id=None, reason=f"export line {number}: not an object")
    return record


def _map_record(raw: Mapping[str, Any]) -> UserChange | RecordError:
    try:
        return to_change(raw)
    except (ValueError, TypeError, KeyError) as exc:
        user_id = raw.get("user_id")
        return RecordError(
            external_id=user_id if isinstance(user_id, str) else None, reason=str(exc), raw=raw
        )


def _records_page(items: list[Mapping[str, Any] | RecordError]) -> Page:
    changes: list[UserChange] = []
    errors: list[RecordError] = []
    for item in items:
        mapped = item if isinstance(item, RecordError) else _map_record(item)
        if isinstance(mapped, RecordError):
            errors.append(mapped)
        else:
            changes.append(mapped)
    seen = [c.external_id for c in changes] + [e.external_id for e in errors if e.external_id]
    return Page(changes=tuple(changes), cursor=None, errors=tuple(errors), seen_ids=tuple(seen))


def _log_list(response: requests.Response) -> list[Mapping[str, Any]]:
    try:
        logs = json_body(response)
    except ValueError as exc:
        raise UpstreamDataError("auth0: GET /api/v2/logs: invalid JSON") from exc
    if not isinstance(logs, list) or not all(isinstance(e, dict) and e.get("log_id") for e in logs):
        raise UpstreamDataError("auth0: GET /api/v2/logs: not a list of log events")
    return logs
