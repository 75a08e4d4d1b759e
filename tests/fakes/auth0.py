"""A fake Auth0 tenant on loopback, following docs/idp/auth0.md.

Endpoints: ``POST /oauth/token`` (client credentials, form-encoded), ``GET /api/v2/users``
(page/per_page/include_totals, 400 past the 1,000-record cap), ``GET /api/v2/users/{id}``,
``POST /api/v2/jobs/users-exports``, ``GET /api/v2/jobs/{id}`` (pending -> processing with
``percentage_done`` and ``time_left_seconds`` -> completed with ``location``),
``GET /api/v2/logs`` (``from``/``take`` checkpoint ordered by ``log_id`` with a
``Link: rel="next"`` header, or search by date). Export files are served, gzipped NDJSON, by a
second server standing in for the CDN (``fake.cdn``), behind a signed URL valid for 60 s, so
credentials sent there would be a visible mistake.

Every rate-limited response carries ``x-ratelimit-limit/remaining/reset`` from a token bucket
per endpoint group (``token``, ``users``, ``jobs``, ``logs``); an empty bucket answers 429.

The tenant's clock is synthetic and advances one second per event, so users and logs are
deterministic for a given seed. An export job completes after ``job_polls`` polls or, with
``export_seconds``, once that long has passed on ``clock`` (give it a test's virtual clock for
exact timings). Mutations (``create_user``, ``update_user``, ``delete_user``, ``login``) write
the log events the real tenant would.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import itertools
import json
import random
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self
from urllib.parse import unquote, urlencode

import orjson

from tests.fakes.http_server import FakeServer, Request, Response, TokenBucket

__all__ = ["EXPORT_PAGE_CAP", "FakeAuth0"]

EXPORT_PAGE_CAP = 1000
_ROUTE_GROUPS = (("POST", "/oauth/token", "token"), ("GET", "/api/v2/users", "users"))
_EPOCH = datetime(2025, 1, 6, 8, 0, tzinfo=UTC)
_FIRST = ("María", "James", "Aiko", "Oluwaseun", "Chen", "Sofia", "Liam", "Fatima", "Noah")
_LAST = ("López", "Smith", "Tanaka", "Adeyemi", "Wang", "Rossi", "O'Brien", "Khan", "Müller")
_LOCALES = ("en-US", "es-ES", "ja-JP", "de-DE", "fr-FR")
_ZONES = ("UTC", "Europe/Madrid", "Asia/Tokyo", "America/New_York")
_AGENTS = ("Mozilla/5.0 (X11; Linux x86_64) Firefox/131.0", "Mozilla/5.0 (iPhone) Safari/604.1")


@dataclass(slots=True)
class _Job:
    id: str
    body: dict[str, Any]
    build: Future[bytes]  # the gzipped file, built in the background as Auth0 does
    polls: int = 0
    created_at: str = ""
    started: float = 0.0  # on the fake's clock
    seconds: float | None = None  # time-based job: done this long after ``started``


@dataclass(slots=True)
class _Limits:
    """Rate limits per endpoint group: (burst, refill per second)."""

    token: tuple[int, float] = (1000, 1000.0)
    users: tuple[int, float] = (1000, 1000.0)
    jobs: tuple[int, float] = (1000, 1000.0)
    logs: tuple[int, float] = (1000, 1000.0)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def bucket(self, group: str) -> TokenBucket:
        if group not in self.buckets:
            capacity, rate = getattr(self, group)
            self.buckets[group] = TokenBucket(capacity, rate)
        return self.buckets[group]


class FakeAuth0(FakeServer):
    """A fake Auth0 tenant; see the module docstring."""

    def __init__(
        self,
        *,
        domain: str = "sync-test.eu.auth0.com",
        client_id: str = "m2m-client-id",
        client_secret: str = "m2m-client-secret",
        token_ttl: int = 86400,
        job_polls: int = 2,
        export_seconds: float | None = None,
        retry_after: bool = False,
        audience: str | None = None,
        seed: int = 7,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.domain, self.client_id, self.client_secret = domain, client_id, client_secret
        self.audience = audience or f"https://{domain}/api/v2/"
        # Where Link headers point; None means this server. A real tenant names its domain.
        self.link_base: str | None = None
        self.token_ttl = token_ttl
        self.job_polls = job_polls
        self.export_seconds = export_seconds
        # Real jobs may not estimate (e.g. while queued); False leaves time_left_seconds out.
        self.report_time_left = True
        self.clock = clock
        self.retry_after = retry_after
        self.users: dict[str, dict[str, Any]] = {}
        self.logs: list[dict[str, Any]] = []
        self.throttled = 0
        self.cdn = FakeServer()
        self._limits = _Limits()
        self._tokens: dict[str, float] = {}
        self._jobs: dict[str, _Job] = {}
        self._rng = random.Random(seed)
        self._now = _EPOCH
        self._log_seq = itertools.count(1)
        self._corrupt_lines: dict[int, bytes] = {}
        self._truncate_export = False
        self._routes_setup()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        self.cdn.start()
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self.cdn.stop()

    def __enter__(self) -> Self:
        return self.start()

    # -- knobs for tests ----------------------------------------------------------------

    def set_limit(self, group: str, burst: int, per_second: float) -> None:
        """Rate-limit an endpoint group (token, users, jobs, logs)."""
        with self.lock:
            setattr(self._limits, group, (burst, per_second))
            self._limits.buckets.pop(group, None)

    def expire_tokens(self) -> None:
        """Every token issued so far is now expired (401 on use)."""
        with self.lock:
            self._tokens = dict.fromkeys(self._tokens, 0.0)

    def corrupt_next_export(self, line: int, text: bytes = b'{"user_id": "auth0|broken", ') -> None:
        """Replace one NDJSON line (0-based) of the next export job's file."""
        self._corrupt_lines[line] = text

    def truncate_next_export(self) -> None:
        """Cut the next export's gzip stream short: an honest length, no end marker."""
        self._truncate_export = True

    # -- tenant data ----------------------------------------------------------------------

    def seed_users(self, count: int, *, signup_logs: bool = True) -> list[dict[str, Any]]:
        """Create ``count`` realistic users (deterministic for the fake's seed)."""
        with self.lock:
            created = [self._new_user(len(self.users) + i) for i in range(count)]
            for user in created:
                self.users[user["user_id"]] = user
                if signup_logs:
                    self._log("ss", user, details={"body": {"email": user["email"]}})
        return copy.deepcopy(created)

    def create_user(self, **fields: Any) -> dict[str, Any]:
        with self.lock:
            user = {**self._new_user(len(self.users)), **fields}
            self.users[user["user_id"]] = user
            self._log("ss", user)
            return copy.deepcopy(user)

    def update_user(self, user_id: str, *, log_type: str = "sapi", **fields: Any) -> dict[str, Any]:
        """Change fields as a Management API PATCH (or ``log_type``, e.g. sce, sv) would."""
        with self.lock:
            # Records are replaced, never changed in place: a running export holds the old.
            user = self.users[user_id] = {
                **self.users[user_id],
                **fields,
                "updated_at": _iso(self._tick()),
            }
            details = _api_details("PATCH", user_id, fields) if log_type == "sapi" else {}
            self._log(log_type, user, details=details, actor_is_api=log_type == "sapi")
            return copy.deepcopy(user)

    def delete_user(self, user_id: str, *, log_type: str = "sdu") -> None:
        with self.lock:
            user = self.users.pop(user_id)
            details = _api_details("DELETE", user_id, None) if log_type == "sapi" else {}
            self._log(log_type, user, details=details, actor_is_api=log_type == "sapi")

    def login(self, user_id: str, *, ip: str = "203.0.113.42") -> dict[str, Any]:
        with self.lock:
            user, now = self.users[user_id], _iso(self._tick())
            user = self.users[user_id] = {
                **user,
                "last_login": now,
                "updated_at": now,
                "last_ip": ip,
                "logins_count": user.get("logins_count", 0) + 1,
            }
            return self._log("s", user, ip=ip, user_agent=self._rng.choice(_AGENTS))

    def add_log(self, log_type: str, user_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """Append a raw log event (for codes without a mutation helper)."""
        with self.lock:
            user = self.users.get(user_id or "", {"user_id": user_id or ""})
            return self._log(log_type, user, **fields)

    # -- routes ---------------------------------------------------------------------------

    def _routes_setup(self) -> None:
        self.route("POST", "/oauth/token", self._token)
        self.route("GET", "/api/v2/users", self._list_users)
        self.route("GET", "/api/v2/users/(?P<id>[^/]+)", self._get_user)
        self.route("POST", "/api/v2/jobs/users-exports", self._create_export)
        self.route("GET", "/api/v2/jobs/(?P<id>[^/]+)", self._get_job)
        self.route("GET", "/api/v2/logs", self._list_logs)
        self.cdn.route("GET", "/exports/(?P<id>[^/]+)/(?P<file>[^/]+)", self._download)

    def dispatch(self, request: Request) -> Response:
        group = _group(request)
        if group is None:
            return super().dispatch(request)
        allowed, headers = self._limits.bucket(group).take()
        if not allowed:
            self.throttled += 1
            response = _error(429, "Too Many Requests", "Global limit has been reached")
            if self.retry_after:
                headers["Retry-After"] = "1"
        elif group != "token" and (denied := self._check_bearer(request)) is not None:
            response = denied
        else:
            response = super().dispatch(request)
        response.headers.update(headers)
        return response

    def _check_bearer(self, request: Request) -> Response | None:
        scheme, _, token = (request.header("Authorization") or "").partition(" ")
        if scheme != "Bearer" or token not in self._tokens:
            return _error(401, "Unauthorized", "Invalid token")
        if self._tokens[token] <= time.time():
            return _error(
                401, "Unauthorized", "Expired token received for JSON Web Token validation"
            )
        return None

    def _token(self, request: Request) -> Response:
        form = (
            request.form()
            if "urlencoded" in (request.header("Content-Type") or "")
            else request.json()
        )
        if form.get("grant_type") != "client_credentials":
            return Response.json({"error": "unsupported_grant_type"}, status=400)
        if (form.get("client_id"), form.get("client_secret")) != (
            self.client_id,
            self.client_secret,
        ):
            return Response.json(
                {"error": "access_denied", "error_description": "Unauthorized"}, 401
            )
        if form.get("audience") != self.audience:
            message = f"Service not enabled within domain: {form.get('audience')}"
            return Response.json({"error": "access_denied", "error_description": message}, 403)
        token = self._jwt()
        self._tokens[token] = time.time() + self.token_ttl
        scope = "read:users read:logs create:users"
        body = {"access_token": token, "expires_in": self.token_ttl, "scope": scope}
        return Response.json({**body, "token_type": "Bearer"})

    def _list_users(self, request: Request) -> Response:
        page, per_page = int(request.arg("page") or 0), int(request.arg("per_page") or 50)
        if per_page > 100:
            return _error(400, "Bad Request", "per_page must be at most 100")
        start = page * per_page
        if start + per_page > EXPORT_PAGE_CAP:
            return _error(400, "Bad Request", "You can only page through the first 1000 records")
        users = list(self.users.values())[start : start + per_page]
        if request.arg("include_totals") != "true":
            return Response.json(users)
        listing = {"start": start, "limit": per_page, "length": len(users), "users": users}
        return Response.json({**listing, "total": len(self.users)})

    def _get_user(self, request: Request) -> Response:
        user = self.users.get(unquote(request.params["id"]))
        if user is None:
            return _error(404, "Not Found", "The user does not exist.")
        return Response.json(user)

    def _create_export(self, request: Request) -> Response:
        body = request.json()
        if body.get("format", "json") != "json":
            return _error(400, "Bad Request", "only json is faked")
        job = _Job(id=f"job_{self._rng.getrandbits(64):016x}", body=body, build=self._export(body))
        job.created_at = _iso(self._now)
        job.started, job.seconds = self.clock(), self.export_seconds
        self._jobs[job.id] = job
        return Response.json(self._job_view(job), status=201)

    def _get_job(self, request: Request) -> Response:
        job = self._jobs.get(request.params["id"])
        if job is None:
            return _error(404, "Not Found", "The job does not exist.")
        job.polls += 1
        return Response.json(self._job_view(job))

    def _job_view(self, job: _Job) -> dict[str, Any]:
        view: dict[str, Any] = {
            "id": job.id,
            "type": "users_export",
            "format": "json",
            "created_at": job.created_at,
        }
        view |= {
            "fields": job.body.get("fields", []),
            "connection_id": job.body.get("connection_id"),
        }
        progress = self._progress(job)
        if progress is not None:
            return {**view, **progress}
        job.build.exception()  # done by the poll count or the clock: the file too, then
        expires = int(time.time()) + 60
        signature = hashlib.sha256(f"{job.id}{expires}".encode()).hexdigest()[:24]
        query = urlencode({"Expires": expires, "Signature": signature, "Key-Pair-Id": "K2FAKE"})
        location = f"{self.cdn.url}/exports/{job.id}/{self.domain.split('.')[0]}.json.gz?{query}"
        return {**view, "status": "completed", "location": location}

    def _progress(self, job: _Job) -> dict[str, Any] | None:
        """Status fields of an unfinished job, None once it is done. The estimate is what a
        server can know: time spent so far scaled by the work left (whole seconds, as Auth0)."""
        elapsed = self.clock() - job.started
        left: float | None
        if job.seconds is not None:
            if elapsed >= job.seconds:
                return None
            done, left = elapsed / job.seconds, job.seconds - elapsed
        else:
            if job.polls > self.job_polls:
                return None
            done = job.polls / (self.job_polls + 1)
            # Completion is counted in polls: left = time per poll so far x polls to go.
            left = elapsed / job.polls * (self.job_polls + 1 - job.polls) if job.polls else None
        progress: dict[str, Any] = {
            "status": "processing" if job.polls else "pending",
            "percentage_done": int(100 * done),
        }
        if self.report_time_left and left is not None:
            progress["time_left_seconds"] = round(left)
        return progress

    def _download(self, request: Request) -> Response:
        job = self._jobs.get(request.params["id"])
        expires = float(request.arg("Expires") or 0)
        if job is None or expires < time.time():
            return Response(status=403, body=b"<Error><Code>AccessDenied</Code></Error>")
        return Response(body=job.build.result(), headers={"Content-Type": "application/gzip"})

    def _list_logs(self, request: Request) -> Response:
        take = int(request.arg("take") or 50)
        if take > 100:
            return _error(400, "Bad Request", "take must be at most 100")
        checkpoint = request.arg("from")
        if checkpoint is None:
            return Response.json(self._search_logs(request))
        page = [log for log in self.logs if log["log_id"] > checkpoint][:take]
        last = page[-1]["log_id"] if page else checkpoint
        query = urlencode({"from": last, "take": take})
        link = f'<{self.link_base or self.url}/api/v2/logs?{query}>; rel="next"'
        return Response.json(page, headers={"Link": link})

    def _search_logs(self, request: Request) -> list[dict[str, Any]]:
        page, per_page = int(request.arg("page") or 0), int(request.arg("per_page") or 50)
        newest_first = (request.arg("sort") or "date:-1") == "date:-1"
        matching = self.logs
        # The one query shape the adapter sends: `date:[* TO <iso>}` (exclusive upper bound).
        bound = re.fullmatch(r"date:\[\* TO (\S+)\}", request.arg("q") or "")
        if bound:
            matching = [log for log in self.logs if log["date"] < bound.group(1)]
        ordered = sorted(
            matching, key=lambda log: (log["date"], log["log_id"]), reverse=newest_first
        )
        return ordered[page * per_page : (page + 1) * per_page]

    # -- generators -----------------------------------------------------------------------

    def _export(self, body: Mapping[str, Any]) -> Future[bytes]:
        """The users as of now, encoded and compressed in a thread while the job runs: the
        answer to the job's creation does not wait for the file (a real tenant's neither)."""
        fields = [(f["name"], f.get("export_as", f["name"])) for f in body.get("fields", [])]
        # The users as of the request (records are replaced, not changed, on update), picked
        # in the thread: the job's creation answers at once, as Auth0's does.
        users = list(self.users.values())[: body.get("limit") or None]
        corrupt, truncate = self._corrupt_lines, self._truncate_export
        self._truncate_export, self._corrupt_lines = False, {}

        def build() -> bytes:
            # orjson: the file must be ready when the job says so, and the fake's own encoding
            # time would otherwise show in the benchmark's export polling.
            picked = (_pick(user, fields) for user in users)
            lines = [corrupt.get(i, orjson.dumps(user)) for i, user in enumerate(picked)]
            content = gzip.compress(b"".join(line + b"\n" for line in lines), compresslevel=6)
            return content[: len(content) * 2 // 3] if truncate else content

        future: Future[bytes] = Future()
        threading.Thread(target=lambda: _settle(future, build), daemon=True).start()
        return future

    def _new_user(self, index: int) -> dict[str, Any]:
        rng = self._rng
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        email = f"{_ascii(first)}.{_ascii(last)}{index}@example.org".lower().replace("'", "")
        social = index % 3 == 1
        provider = "google-oauth2" if social else "auth0"
        local_id = str(rng.randrange(10**20, 10**21)) if social else f"{rng.getrandbits(96):024x}"
        connection = provider if social else "Username-Password-Authentication"
        identity = {"provider": provider, "connection": connection, "user_id": local_id}
        created = _EPOCH + timedelta(
            hours=index, minutes=rng.randrange(60), milliseconds=rng.randrange(1000)
        )
        updated = created + timedelta(days=rng.randrange(1, 300), seconds=rng.randrange(86400))
        self._now = max(self._now, updated)  # the tenant's clock is past every stored timestamp
        user: dict[str, Any] = {
            "user_id": f"{provider}|{local_id}",
            "email": email,
            "email_verified": social or rng.random() < 0.8,
            "name": f"{first} {last}",
            "given_name": first,
            "family_name": last,
            "nickname": email.split("@")[0],
            "picture": f"https://s.gravatar.com/avatar/{_digest(email)}?s=480",
            "identities": [{**identity, "isSocial": social}],
            "user_metadata": self._user_metadata(rng),
            "app_metadata": self._app_metadata(rng),
            "created_at": _iso(created),
            "updated_at": _iso(updated),
            "last_login": _iso(updated),
            "last_ip": f"198.51.100.{rng.randrange(1, 255)}",
            "logins_count": rng.randrange(1, 200),
            "blocked": index % 50 == 7,
        }
        if index % 4 == 2:
            user["phone_number"] = f"+1555{rng.randrange(10**6, 10**7)}"
        if index % 7 == 3:
            github = {"provider": "github", "connection": "github", "isSocial": True}
            github |= {"user_id": str(rng.randrange(10**6, 10**8)), "profileData": {"email": email}}
            user["identities"].append(github)
        return user

    @staticmethod
    def _user_metadata(rng: random.Random) -> dict[str, Any]:
        if rng.random() < 0.3:
            return {}
        return {
            "locale": rng.choice(_LOCALES),
            "timezone": rng.choice(_ZONES),
            "newsletter": rng.random() < 0.5,
        }

    @staticmethod
    def _app_metadata(rng: random.Random) -> dict[str, Any]:
        if rng.random() < 0.2:
            return {}
        return {
            "tenant_id": f"t_{rng.randrange(1000, 9999)}",
            "roles": [rng.choice(("member", "editor", "admin"))],
        }

    def _log(
        self, log_type: str, user: Mapping[str, Any], *, actor_is_api: bool = False, **fields: Any
    ) -> dict[str, Any]:
        connection = (user.get("identities") or [{}])[0].get("connection")
        record: dict[str, Any] = {
            "log_id": f"9002{next(self._log_seq):052d}",
            "date": _iso(self._tick()),
            "type": log_type,
            "description": "",
            "client_id": self.client_id if actor_is_api else "app-client-id",
            "client_name": "sync-test" if actor_is_api else "Web App",
            "connection": connection,
            "user_id": "" if actor_is_api else user.get("user_id", ""),
            "user_name": user.get("email", ""),
            "ip": "203.0.113.9",
            "user_agent": _AGENTS[0],
            "hostname": self.domain,
            "tenant_name": self.domain.split(".")[0],
            **fields,
        }
        self.logs.append(record)
        return copy.deepcopy(record)

    def _tick(self) -> datetime:
        self._now += timedelta(seconds=1, milliseconds=self._rng.randrange(1000))
        return self._now

    def _jwt(self) -> str:
        header = {"alg": "RS256", "typ": "JWT", "kid": "fake"}
        now = int(time.time())
        claims: dict[str, str | int] = {
            "iss": f"https://{self.domain}/",
            "sub": f"{self.client_id}@clients",
            "aud": self.audience,
        }
        claims |= {"iat": now, "exp": now + self.token_ttl, "jti": f"{self._rng.getrandbits(64):x}"}
        parts = [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode())]
        return ".".join([*parts, _b64(self._rng.randbytes(32))])


def _group(request: Request) -> str | None:
    for method, prefix, group in _ROUTE_GROUPS:
        if request.method == method and request.path.startswith(prefix):
            return group
    for prefix in ("jobs", "logs"):
        if request.path.startswith(f"/api/v2/{prefix}"):
            return prefix
    return None


def _error(status: int, error: str, message: str) -> Response:
    code = {404: "inexistent_user", 429: "too_many_requests"}.get(status)
    body = {"statusCode": status, "error": error, "message": message}
    return Response.json({**body, **({"errorCode": code} if code else {})}, status=status)


def _api_details(method: str, user_id: str, body: Any) -> dict[str, Any]:
    path = f"/api/v2/users/{user_id}"
    return {
        "request": {"method": method.lower(), "path": path, "body": body},
        "response": {"statusCode": 200},
    }


def _pick(user: Mapping[str, Any], fields: Iterable[tuple[str, str]]) -> dict[str, Any]:
    return {alias: user[name] for name, alias in fields if name in user}


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _settle(future: Future[bytes], build: Callable[[], bytes]) -> None:
    try:
        future.set_result(build())
    except BaseException as exc:  # surfaces in the download
        future.set_exception(exc)
