"""A fake Stack Auth (Hexclave) server REST API on loopback, shaped after docs/idp/stack.md.

Routes (under ``/api/v1``): ``GET /users`` (cursor pagination, default filtering),
``GET /users/{id}``, ``GET /teams`` (not paginated, ``?user_id=``), ``GET /teams/{id}``,
``GET /team-member-profiles`` (not paginated, ``?team_id=&user_id=``). Every request must
carry the server headers ``<prefix>-access-type: server``, ``<prefix>-project-id`` and
``<prefix>-secret-server-key``; the prefix (``x-stack`` or ``x-hexclave``) is configurable.
Errors are Stack "known errors": ``{"code", "error"[, "details"]}`` plus an
``X-Stack-Known-Error`` header.

The state is plain dicts the tests mutate through small methods (``add_user``,
``update_user``, ``delete_user``, ``touch``, ``add_team``, ``add_member``, ...). Faults come
from ``FakeServer.fail_next`` plus ``throttle`` (429 with or without ``Retry-After``),
``limit_rate`` (a windowed limiter like the backend's development limiter),
``malformed_next`` and ``truncate_next``.
"""

from __future__ import annotations

import copy
import itertools
import random
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tests.fakes.http_server import FakeServer, Request, Response

__all__ = ["DEFAULT_PROJECT_ID", "DEFAULT_SECRET_KEY", "USERS_PATH", "StackFake"]

DEFAULT_PROJECT_ID = "2d4f1c7e-5a0b-4f3e-9c1d-7b8a6e5f4d3c"
DEFAULT_SECRET_KEY = "ssk_test_6c1e0f2a9b8d7c6e5f4a3b2c1d0e9f8a"
API = "/api/v1"
USERS_PATH = f"{API}/users"
TEAMS_PATH = f"{API}/teams"
MEMBER_PROFILES_PATH = f"{API}/team-member-profiles"
# 2024-01-01T00:00:00Z: every timestamp the fake invents is a fixed step after this.
BASE_MILLIS = 1_704_067_200_000
_UUID = r"[0-9A-Za-z-]+"

_FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Radia", "Donald", "Frances"]
_LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Perlman", "Knuth"]
_OAUTH = ["github", "google", "microsoft", "discord"]
_LOCALES = [("en-US", "America/New_York"), ("de-DE", "Europe/Berlin"), ("ja-JP", "Asia/Tokyo")]


@dataclass(slots=True)
class Membership:
    team_id: str
    user_id: str
    selected: bool = False


class StackFake(FakeServer):
    """Fake Stack Auth server API; a context manager like every ``FakeServer``."""

    def __init__(
        self,
        *,
        project_id: str = DEFAULT_PROJECT_ID,
        secret_server_key: str = DEFAULT_SECRET_KEY,
        header_prefix: str = "x-stack",
        require_email_verification: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.project_id = project_id
        self.secret_server_key = secret_server_key
        self.header_prefix = header_prefix.lower()
        self.require_email_verification = require_email_verification
        self.users: dict[str, dict[str, Any]] = {}
        self.teams: dict[str, dict[str, Any]] = {}
        self.memberships: list[Membership] = []  # in creation order, like TeamMember.createdAt
        self._rng = random.Random(seed)
        self._tick = itertools.count(1)
        self._limit: tuple[int, float] | None = None
        self._window: list[float] = []
        self._limited = itertools.count()
        self._register_routes()

    def _register_routes(self) -> None:
        self.route("GET", USERS_PATH, self._list_users)
        self.route("GET", rf"{USERS_PATH}/(?P<user_id>{_UUID})", self._get_user)
        self.route("GET", TEAMS_PATH, self._list_teams)
        self.route("GET", rf"{TEAMS_PATH}/(?P<team_id>{_UUID})", self._get_team)
        self.route("GET", MEMBER_PROFILES_PATH, self._list_member_profiles)

    # -- state: users -------------------------------------------------------------------

    def now_millis(self) -> int:
        """The fake's clock: strictly increasing, one second per call, deterministic."""
        return BASE_MILLIS + next(self._tick) * 1000

    def add_user(self, **fields: Any) -> str:
        """Create a user from realistic defaults overridden by ``fields``; return its id."""
        user = self._default_user()
        user.update(fields)
        with self.lock:
            self.users[user["id"]] = user
        return str(user["id"])

    def update_user(self, user_id: str, **fields: Any) -> None:
        with self.lock:
            self.users[user_id].update(fields)

    def delete_user(self, user_id: str) -> None:
        with self.lock:
            del self.users[user_id]
            self.memberships = [m for m in self.memberships if m.user_id != user_id]

    def touch(self, user_id: str, millis: int | None = None) -> None:
        """Bump ``last_active_at_millis``, as any sign-in or request by the user does."""
        self.update_user(user_id, last_active_at_millis=millis or self.now_millis())

    def upgrade_anonymous(self, user_id: str, email: str) -> None:
        """Upgrade an anonymous user; like the backend, this resets ``signed_up_at`` to now."""
        self.update_user(
            user_id,
            is_anonymous=False,
            primary_email=email,
            signed_up_at_millis=self.now_millis(),
        )

    def seed(
        self,
        count: int,
        *,
        anonymous_every: int = 0,
        restricted_every: int = 0,
        oauth_every: int = 3,
    ) -> list[str]:
        """Add ``count`` users; every n-th one anonymous / restricted / with an OAuth account."""
        ids = []
        for n in range(1, count + 1):
            fields: dict[str, Any] = {}
            if anonymous_every and n % anonymous_every == 0:
                fields = _anonymous_fields()
            elif restricted_every and n % restricted_every == 0:
                fields = {"restricted_by_admin": True, "restricted_by_admin_reason": "spam"}
            user_id = self.add_user(**fields)
            if oauth_every and n % oauth_every == 0 and not fields.get("is_anonymous"):
                self.link_oauth(user_id, self._rng.choice(_OAUTH))
            ids.append(user_id)
        return ids

    def link_oauth(self, user_id: str, provider_id: str, account_id: str | None = None) -> None:
        user = self.users[user_id]
        account = account_id or str(self._rng.randrange(10**7, 10**9))
        entry = {"id": provider_id, "account_id": account, "email": user["primary_email"]}
        with self.lock:
            user["oauth_providers"] = [*user["oauth_providers"], entry]

    def _default_user(self) -> dict[str, Any]:
        first, last = self._rng.choice(_FIRST), self._rng.choice(_LAST)
        user_id = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        email = f"{first}.{last}.{user_id[:6]}@example.com".lower()
        locale, timezone = self._rng.choice(_LOCALES)
        signed_up = self.now_millis()
        return {
            "id": user_id,
            "primary_email": email,
            "primary_email_verified": True,
            "primary_email_auth_enabled": True,
            "display_name": f"{first} {last}",
            "profile_image_url": f"https://avatars.example.com/{user_id[:8]}.png",
            "signed_up_at_millis": signed_up,
            "last_active_at_millis": signed_up,
            "has_password": True,
            "otp_auth_enabled": False,
            "passkey_auth_enabled": False,
            "auth_with_email": True,
            "requires_totp_mfa": False,
            "client_metadata": {"locale": locale, "timezone": timezone},
            "client_read_only_metadata": None,
            "server_metadata": None,
            "is_anonymous": False,
            "restricted_by_admin": False,
            "restricted_by_admin_reason": None,
            "restricted_by_admin_private_details": None,
            "country_code": "US",
            "risk_scores": {"sign_up": {"bot": 0, "free_trial_abuse": 0}},
            "oauth_providers": [],
        }

    # -- state: teams -------------------------------------------------------------------

    def add_team(
        self,
        display_name: str,
        *,
        members: Iterable[str] = (),
        server_metadata: dict[str, Any] | None = None,
        team_id: str | None = None,
    ) -> str:
        """Create a team (created now, so teams list in creation order); add ``members``."""
        new_id = team_id or str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        team = {
            "id": new_id,
            "display_name": display_name,
            "profile_image_url": None,
            "created_at_millis": self.now_millis(),
            "client_metadata": None,
            "client_read_only_metadata": None,
            "server_metadata": server_metadata,
        }
        with self.lock:
            self.teams[new_id] = team
        for user_id in members:
            self.add_member(new_id, user_id)
        return new_id

    def add_personal_team(self, user_id: str, *, flag_key: str | None = "personal") -> str:
        """A team as ``createPersonalTeamOnSignUp`` makes it: named, joined and selected.

        Stack itself sets no metadata on it; ``flag_key`` plays the operator who marks
        personal teams in ``server_metadata`` (reference §4).
        """
        user = self.users[user_id]
        owner = user["display_name"] or user["primary_email"]
        name = f"{owner}'s Team" if owner else "Personal Team"
        metadata = {flag_key: True} if flag_key else None
        team_id = self.add_team(name, server_metadata=metadata)
        self.add_member(team_id, user_id, selected=True)
        return team_id

    def add_member(self, team_id: str, user_id: str, *, selected: bool = False) -> None:
        with self.lock:
            self.memberships.append(Membership(team_id, user_id))
        if selected:
            self.select_team(user_id, team_id)

    def remove_member(self, team_id: str, user_id: str) -> None:
        with self.lock:
            self.memberships = [
                m for m in self.memberships if (m.team_id, m.user_id) != (team_id, user_id)
            ]

    def select_team(self, user_id: str, team_id: str | None) -> None:
        with self.lock:
            for membership in self.memberships:
                if membership.user_id == user_id:
                    membership.selected = membership.team_id == team_id

    def delete_team(self, team_id: str) -> None:
        with self.lock:
            del self.teams[team_id]
            self.memberships = [m for m in self.memberships if m.team_id != team_id]

    # -- faults -------------------------------------------------------------------------

    def throttle(
        self, times: int = 1, *, retry_after: str | None = "0.01", path: str = USERS_PATH
    ) -> None:
        """The next ``times`` requests get 429, with ``Retry-After`` unless it is None."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self.fail_next(path, status=429, times=times, headers=headers, body=_rate_limited())

    def limit_rate(self, max_requests: int | None, per_seconds: float = 1.0) -> None:
        """Allow ``max_requests`` per sliding window; 429 beyond, ``Retry-After`` on half.

        Mirrors the backend's development limiter (reference §5), which sets Retry-After
        on only 50% of its 429s. ``None`` switches the limiter off.
        """
        with self.lock:
            self._limit = None if max_requests is None else (max_requests, per_seconds)
            self._window = []

    def malformed_next(self, path: str = USERS_PATH, times: int = 1) -> None:
        """A 200 whose body is not JSON (a proxy's HTML page, a half-written cache entry)."""
        self.fail_next(path, status=200, times=times, body=b'{"items": [{"id": "')

    def truncate_next(self, path: str = USERS_PATH, times: int = 1, length: int = 40) -> None:
        """The real page, cut after ``length`` bytes and the connection closed."""
        self.fail_next(path, status=None, times=times, truncate=length)

    # -- request handling ---------------------------------------------------------------

    def dispatch(self, request: Request) -> Response:
        refused = self._check_auth(request) or self._check_rate(request)
        response = refused or super().dispatch(request)
        response.headers.setdefault("x-stack-request-id", str(uuid.uuid4()))
        return response

    def _check_auth(self, request: Request) -> Response | None:
        prefix = self.header_prefix
        access_type = request.header(f"{prefix}-access-type")
        project_id = request.header(f"{prefix}-project-id")
        key = request.header(f"{prefix}-secret-server-key")
        if not access_type:
            return _known(400, "ACCESS_TYPE_REQUIRED", f"You must specify {prefix}-access-type.")
        if access_type != "server":
            details = {"actual_access_type": access_type, "allowed_access_types": ["server"]}
            message = f"The {prefix}-access-type header must be 'server'."
            return _known(401, "INSUFFICIENT_ACCESS_TYPE", message, details)
        if not project_id:
            return _known(400, "ACCESS_TYPE_WITHOUT_PROJECT_ID", "No project id was provided.")
        if not key:
            return _known(401, "SERVER_AUTHENTICATION_REQUIRED", "A server key is required.")
        if project_id != self.project_id or key != self.secret_server_key:
            message = "The secret server key is not valid for the project."
            return _known(401, "INVALID_SECRET_SERVER_KEY", message, {"project_id": project_id})
        return None

    def _check_rate(self, request: Request) -> Response | None:
        if self._limit is None:
            return None
        max_requests, window = self._limit
        now = time.monotonic()
        self._window = [t for t in self._window if now - t < window]
        if len(self._window) < max_requests:
            self._window.append(now)
            return None
        wait = window - (now - self._window[0])
        headers = {"Retry-After": f"{wait:.3f}"} if next(self._limited) % 2 == 0 else {}
        return Response.json(_rate_limited(), status=429, headers=headers)

    # -- routes -------------------------------------------------------------------------

    def _list_users(self, request: Request) -> Response:
        try:
            query = _UserQuery.parse(request)
        except ValueError as exc:
            return _known(400, "SCHEMA_ERROR", f"Request validation failed: {exc}")
        if query.team_id and query.team_id not in self.teams:
            return _known(404, "TEAM_NOT_FOUND", "Team not found.")
        users = [u for u in self._sorted_users(query.desc) if self._visible(u, query)]
        start = 0
        if query.cursor is not None:
            # Prisma's cursor includes the cursor row; a vanished cursor row yields nothing.
            ids = [u["id"] for u in users]
            start = ids.index(query.cursor) if query.cursor in ids else len(users)
        end = len(users) if query.limit is None else start + query.limit
        page = users[start:end]
        next_cursor = users[end]["id"] if end < len(users) else None
        body = {
            "items": [self._render_user(u) for u in page],
            "is_paginated": True,
            "pagination": {"next_cursor": next_cursor},
        }
        return Response.json(body)

    def _get_user(self, request: Request) -> Response:
        user = self.users.get(request.params["user_id"])
        if user is None:
            return _user_not_found()
        return Response.json(self._render_user(user))

    def _list_teams(self, request: Request) -> Response:
        user_id = request.arg("user_id")
        if user_id is not None and user_id not in self.users:
            return _user_not_found()
        member_of = {m.team_id for m in self.memberships if m.user_id == user_id}
        teams = [t for t in self._sorted_teams() if user_id is None or t["id"] in member_of]
        return Response.json({"items": copy.deepcopy(teams), "is_paginated": False})

    def _get_team(self, request: Request) -> Response:
        team = self.teams.get(request.params["team_id"])
        if team is None:
            return _known(404, "TEAM_NOT_FOUND", "Team not found.")
        return Response.json(copy.deepcopy(team))

    def _list_member_profiles(self, request: Request) -> Response:
        team_id, user_id = request.arg("team_id"), request.arg("user_id")
        if team_id is not None and team_id not in self.teams:
            return _known(404, "TEAM_NOT_FOUND", "Team not found.")
        if user_id is not None and user_id not in self.users:
            return _user_not_found()
        items = [
            self._render_profile(m)
            for m in self.memberships
            if team_id in (None, m.team_id) and user_id in (None, m.user_id)
        ]
        return Response.json({"items": items, "is_paginated": False})

    # -- rendering ----------------------------------------------------------------------

    def _sorted_users(self, desc: bool) -> list[dict[str, Any]]:
        key = lambda u: (u["signed_up_at_millis"], u["id"])  # noqa: E731
        return sorted(self.users.values(), key=key, reverse=desc)

    def _sorted_teams(self) -> list[dict[str, Any]]:
        return sorted(self.teams.values(), key=lambda t: (t["created_at_millis"], t["id"]))

    def _visible(self, user: dict[str, Any], query: _UserQuery) -> bool:
        """The backend's list filter: anonymous and restricted users are hidden by default."""
        include_restricted = query.include_restricted or query.include_anonymous
        if user["is_anonymous"] and not query.include_anonymous:
            return False
        if query.only_anonymous and not user["is_anonymous"]:
            return False
        if not include_restricted and user["restricted_by_admin"]:
            return False
        unverified = not user["primary_email_verified"]
        if not include_restricted and self.require_email_verification and unverified:
            return False
        return query.team_id is None or self._is_member(query.team_id, user["id"])

    def _is_member(self, team_id: str, user_id: str) -> bool:
        return any(m.team_id == team_id and m.user_id == user_id for m in self.memberships)

    def _render_user(self, user: dict[str, Any]) -> dict[str, Any]:
        rendered = copy.deepcopy(user)
        selected = next(
            (m for m in self.memberships if m.user_id == user["id"] and m.selected), None
        )
        team = self.teams.get(selected.team_id) if selected else None
        rendered["selected_team_id"] = team["id"] if team else None
        rendered["selected_team"] = copy.deepcopy(team)
        rendered["is_restricted"], rendered["restricted_reason"] = self._restriction(user)
        return rendered

    def _restriction(self, user: dict[str, Any]) -> tuple[bool, dict[str, str] | None]:
        if user["is_anonymous"]:
            return True, {"type": "anonymous"}
        if self.require_email_verification and not user["primary_email_verified"]:
            return True, {"type": "email_not_verified"}
        if user["restricted_by_admin"]:
            return True, {"type": "restricted_by_administrator"}
        return False, None

    def _render_profile(self, membership: Membership) -> dict[str, Any]:
        user = self._render_user(self.users[membership.user_id])
        return {
            "team_id": membership.team_id,
            "user_id": membership.user_id,
            "display_name": user["display_name"],
            "profile_image_url": user["profile_image_url"],
            "user": user,
        }

    def listed_ids(
        self, *, include_anonymous: bool = False, include_restricted: bool = False
    ) -> Iterator[str]:
        """Ids ``GET /users`` returns with these flags, in order (a test oracle)."""
        query = _UserQuery(
            include_anonymous=include_anonymous, include_restricted=include_restricted
        )
        return (u["id"] for u in self._sorted_users(query.desc) if self._visible(u, query))


@dataclass(frozen=True, slots=True, kw_only=True)
class _UserQuery:
    limit: int | None = None
    cursor: str | None = None
    desc: bool = False
    team_id: str | None = None
    include_anonymous: bool = False
    include_restricted: bool = False
    only_anonymous: bool = False

    @classmethod
    def parse(cls, request: Request) -> _UserQuery:
        """Validate like the backend's yup schema; a ValueError becomes a 400."""
        if request.arg("order_by", "signed_up_at") != "signed_up_at":
            raise ValueError("order_by must be one of: signed_up_at")
        query = cls(
            limit=_limit(request.arg("limit")),
            cursor=_uuid_or_none(request.arg("cursor")),
            desc=_flag(request, "desc"),
            team_id=_uuid_or_none(request.arg("team_id")),
            include_anonymous=_flag(request, "include_anonymous"),
            include_restricted=_flag(request, "include_restricted"),
            only_anonymous=_flag(request, "only_anonymous"),
        )
        if query.only_anonymous and not query.include_anonymous:
            raise ValueError("only_anonymous requires include_anonymous=true")
        return query


def _limit(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError("limit must be an integer >= 1")
    return int(value)


def _uuid_or_none(value: str | None) -> str | None:
    if value is not None:
        uuid.UUID(value)  # raises ValueError, as the backend's uuid() schema rejects it
    return value


def _flag(request: Request, name: str) -> bool:
    value = request.arg(name, "false")
    if value not in ("true", "false"):
        raise ValueError(f'{name} must be one of: "true", "false"')
    return value == "true"


def _anonymous_fields() -> dict[str, Any]:
    return {
        "primary_email": None,
        "primary_email_verified": False,
        "primary_email_auth_enabled": False,
        "display_name": None,
        "profile_image_url": None,
        "has_password": False,
        "auth_with_email": False,
        "client_metadata": None,
        "is_anonymous": True,
    }


def _known(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Response:
    body: dict[str, Any] = {"code": code, "error": message}
    if details is not None:
        body["details"] = details
    return Response.json(body, status=status, headers={"X-Stack-Known-Error": code})


def _user_not_found() -> Response:
    return _known(404, "USER_NOT_FOUND", "User not found.")


def _rate_limited() -> dict[str, Any]:
    return {"error": "Too many requests. Please try again later."}
