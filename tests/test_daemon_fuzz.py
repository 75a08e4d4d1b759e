"""Fuzzing the webhook endpoints through the in-process app, on SQLite and PostgreSQL.

Requests go straight into the ASGI app (as a server hands them over: raw header bytes,
duplicates kept, the body in chunks), so nothing in a client library tidies them first.
Properties:

- whatever arrives, the answer is never a 5xx (503 only means "the database cannot store",
  which these tests never arrange);
- nothing is stored unless the request carries a valid signature (or token) of a configured
  secret: a stranger gets 401 (or 404, 413, 415), never a 400 that says the body was read;
- a real delivery, mutated and then validly re-signed, is stored (200) or refused (400),
  and draining whatever was stored never raises out of ``drain_once``: each row ends done,
  ignored, failed (retried later) or dead, never left leased.

``SYNC_WORKER_FUZZ_EXAMPLES=500`` runs more examples per test (a longer hunt, by hand).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from db.tables import sync_inbox
from sync_worker import simulate
from tests.daemon_harness import SECRETS, Harness, harness
from tests.factories import audit, rows
from tests.webhook_cases import new_secret

LIMIT = 64 * 1024  # the app's body limit here: big enough for huge strings, cheap to fill
# Sized so that the file runs in about 15 s on an idle two-core machine.
EXAMPLES = int(os.environ.get("SYNC_WORKER_FUZZ_EXAMPLES", "75"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,  # the database's speed varies with the machine's load
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,  # one database per test, kept by its examples
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


OTHER = {"stack": new_secret(), "authjs": new_secret(), "auth0": "another-token-9c1e0f3b"}
# What Svix (Stack) and Standard Webhooks (Auth.js) call the three signature headers.
FAMILY = {"stack": "svix", "authjs": "webhook"}
SIGNED = ("stack", "authjs")
FINISHED = {"done", "ignored", "failed", "dead"}

RawHeaders = list[tuple[bytes, bytes]]


# -- the app, called as a server calls it ------------------------------------------------


def post(app: Any, provider: str, headers: RawHeaders, body: bytes, *, chunk: int) -> int:
    """POST ``body`` in ``chunk``-sized parts; the response status. An exception the app
    lets out (a server would answer 500) fails the test with its traceback."""
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not parts:
            return {"type": "http.disconnect"}
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    path = f"/webhooks/{provider}"
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": headers, "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 50000),
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    status = int(next(m for m in sent if m["type"] == "http.response.start")["status"])
    assert status < 500, f"{status} for {provider}"
    return status


def inbox_count(db: Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(sync_inbox)).scalar_one())


# -- signing any bytes, as the senders do ---------------------------------------------------


def hmac_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    """A Svix / Standard Webhooks ``v1`` signature over raw bytes (the libraries sign text
    only; a sender may sign any bytes)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(
    provider: str,
    body: bytes,
    *,
    secret: str | None = None,
    msg_id: str | None = None,
    when: datetime | None = None,
) -> dict[str, str]:
    """The credential headers of ``provider`` for ``body`` (configured secret by default)."""
    secret = secret or SECRETS[provider]
    if provider == "auth0":
        return {"authorization": secret}
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    stamp = str(int((when or datetime.now(UTC)).timestamp()))
    prefix = FAMILY[provider]
    return {
        f"{prefix}-id": msg_id,
        f"{prefix}-timestamp": stamp,
        f"{prefix}-signature": hmac_signature(secret, msg_id, stamp, body),
    }


def raw(headers: dict[str, str], *, content_type: str = "application/json") -> RawHeaders:
    pairs = {"content-type": content_type, **headers}
    return [(k.lower().encode(), v.encode()) for k, v in pairs.items()]


# -- strategies -------------------------------------------------------------------------------

PROVIDERS = st.sampled_from(["stack", "authjs", "auth0"])
# Mostly the real endpoints and JSON types (repeated entries weigh a choice), so that most
# requests get past 404 and 415 to the credentials.
ENDPOINTS = st.sampled_from(
    ["stack", "authjs", "auth0"] * 4 + ["nope", "Stack", "auth0x", "authjs.json", "..", "%00"]
)
JSON_TYPES = [
    "application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
    "application/cloudevents+json", "application/x-ndjson", "application/jsonl",
    " application/json ;;", "application/json; charset=latin-1",
]  # fmt: skip
OTHER_TYPES = [
    "text/plain", "application/x-www-form-urlencoded", "application/", "+json", "",
    "multipart/form-data; boundary=x", "application/json\x00",
]  # fmt: skip
CONTENT_TYPES = st.sampled_from([*JSON_TYPES * 2, *OTHER_TYPES, "?"]).flatmap(
    lambda t: st.text(max_size=40) if t == "?" else st.just(t)
)
KNOWN_NAMES = (
    "svix-id", "svix-timestamp", "svix-signature", "webhook-id", "webhook-timestamp",
    "webhook-signature", "authorization", "content-type", "content-length",
)  # fmt: skip
HEADER_NAMES = (
    st.sampled_from(KNOWN_NAMES)
    | st.sampled_from(KNOWN_NAMES).map(str.upper)
    | st.sampled_from(["Svix-Id", "Webhook-Signature", "Authorization", "Content-Type"])
    | st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,30}", fullmatch=True)
)


def _now_offset(seconds: int) -> str:
    return str(int(datetime.now(UTC).timestamp()) + seconds)


TIMESTAMPS = (
    st.integers(-400, 400).map(_now_offset)
    | st.integers(-(10**6), 10**6).map(lambda d: _now_offset(d * 1000))
    | st.sampled_from(
        [
            "",
            "0",
            "-1",
            "1e9",
            "1700000000.5",
            " 1700000000 ",
            "9" * 30,
            "NaN",
            "\u0661\u0667" + "\u0660" * 8,
        ]
    )
)
FORGED_SIGNATURES = (
    st.binary(min_size=32, max_size=32).map(lambda b: "v1," + base64.b64encode(b).decode())
    | st.lists(
        st.binary(min_size=1, max_size=48).map(lambda b: "v1," + base64.b64encode(b).decode()),
        min_size=1,
        max_size=5,
    ).map(" ".join)
    | st.sampled_from(["v1,", "v1", "v2,AAAA", "v1,!!!!", "v1,AAA=", ",", "v1,,v1,"])
)
WRONG_TOKENS = st.sampled_from(
    [
        SECRETS["auth0"][:-1], SECRETS["auth0"] + "x", SECRETS["auth0"].upper(),
        "Bearer " + SECRETS["auth0"][:-1], "Basic " + SECRETS["auth0"], "Bearer",
        "Bearer " + OTHER["auth0"], OTHER["auth0"], "",
    ]
) | st.text(max_size=80)  # fmt: skip
HEADER_CHARS = st.characters(codec="latin-1", exclude_characters="\r\n")
HEADER_TEXT = st.text(HEADER_CHARS, max_size=80).map(lambda t: t.encode("latin-1"))
HEADER_VALUES = (
    HEADER_TEXT
    | st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))  # non-ASCII
    | st.integers(1_000, 100_000).map(lambda n: b"v1," + b"A" * n)  # huge
    | TIMESTAMPS.map(str.encode)
    | FORGED_SIGNATURES.map(str.encode)
    | WRONG_TOKENS.map(lambda t: t.encode("utf-8", "surrogatepass"))
)
RANDOM_HEADERS = st.lists(st.tuples(HEADER_NAMES.map(str.encode), HEADER_VALUES), max_size=8)
MAX_HEADERS = 4 + 2 + 8  # forged credentials, content length and type, random ones

# JSON values, with the awkward ones the receivers must refuse or carry.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=10**400)
    | st.floats()  # NaN and infinities included: json.dumps writes NaN, Infinity
    | st.text(max_size=20)  # lone surrogates and NUL included
    | st.sampled_from(["", "\x00", "\ud800", "2026-03-01T12:00:00Z", "9" * 40, "a@b", "user"])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=5),
    max_leaves=25,
)  # fmt: skip


def _deep(depth: int) -> bytes:
    return b'{"type":"user.created","data":' + b'{"a":[' * depth + b"1" + b"]}" * depth + b"}"


PATHOLOGICAL = st.one_of(
    st.integers(1, 3000).map(_deep),  # deep nesting, past Python's recursion limit too
    st.integers(1, LIMIT - 80).map(  # a huge string, under the limit
        lambda n: b'{"type":"user.created","data":{"id":"u","display_name":"' + b"x" * n + b'"}}'
    ),
    st.sampled_from([
        b'{"type":"user.created","data":{"id":"u","display_name":NaN}}',
        b'{"type":"user.created","data":{"id":"u","x":Infinity}}',
        b'{"type":"user.created","data":{"id":"u","x":1e999}}',
        b'{"type":"user.created","data":{"id":"u\\u0000"}}',
        b'{"type":"user.created","data":{"id":"u\x00"}}',
        b'{"type":"user.created","data":{"id":"\\ud800"}}',
        b'{"type":"user.created","data":{"id":"\xed\xa0\x80"}}',  # a surrogate, UTF-8 coded
        b'{"type":"user.created","data":{"id":"u"}}\n{"type":"user.deleted"}',
        b"\xef\xbb\xbf{}", b"[]", b"[[]]", b"{}", b"null", b"", b" ", b"\n\n", b"1" * 5000,
    ]),
)  # fmt: skip
BODIES = (
    st.binary(max_size=300)
    | JSON_VALUES.map(lambda v: json.dumps(v).encode())
    | PATHOLOGICAL
    | st.just(b" " * (LIMIT + 1))  # over the limit
)


# -- 1. without a valid credential nothing is stored ------------------------------------------


@pytest.fixture
def daemon(engine: Engine) -> Harness:
    return harness(engine, max_body_bytes=LIMIT)


@fuzz(EXAMPLES)
@given(
    data=st.data(),
    endpoint=ENDPOINTS,
    body=BODIES,
    content_type=CONTENT_TYPES,
    extra=RANDOM_HEADERS,
)
def test_without_a_valid_credential_nothing_is_stored(
    daemon: Harness,
    data: st.DataObject,
    endpoint: str,
    body: bytes,
    content_type: str,
    extra: RawHeaders,
) -> None:
    # Credential-shaped headers that do not verify: another secret's signature over this
    # very body, forged signatures, any timestamp, or a wrong Auth0 token.
    family = data.draw(st.sampled_from(["svix", "webhook"]))
    msg_id = data.draw(st.text(HEADER_CHARS, min_size=1, max_size=40) | st.just("msg_1"))
    stamp = data.draw(TIMESTAMPS)
    other = hmac_signature(OTHER["stack"], msg_id, stamp, body)
    forged = {
        f"{family}-id": msg_id,
        f"{family}-timestamp": stamp,
        f"{family}-signature": data.draw(FORGED_SIGNATURES | st.just(other)),
        "authorization": data.draw(WRONG_TOKENS),
    }
    credentials = data.draw(st.sets(st.sampled_from(sorted(forged))))
    headers = [(k.encode(), forged[k].encode("utf-8", "surrogatepass")) for k in credentials]
    length = data.draw(
        st.sampled_from(
            [str(len(body)), "", "0", "-1", "1" * 40, "9" * 5000, " 12", "0x10", "\xb2", "½"]
        )
    )
    if length:
        headers.append((b"content-length", length.encode("latin-1", "replace")))
    headers.append((b"content-type", content_type.encode("utf-8", "surrogatepass")))
    headers += extra
    lowercase = data.draw(st.booleans())  # as servers pass names; else as generated
    if lowercase:
        headers = [(k.lower(), v) for k, v in headers]
    # Shuffled by drawn sort keys, a fixed number of them: st.permutations(headers), whose
    # draws vary with the list's length, made hypothesis report FlakyStrategyDefinition
    # instead of the failure while shrinking.
    keys = data.draw(st.lists(st.integers(0, 255), min_size=MAX_HEADERS, max_size=MAX_HEADERS))
    ordered = [h for _, h in sorted(zip(keys, headers, strict=False), key=lambda p: p[0])]
    chunk = data.draw(st.sampled_from([max(1, len(body) // 3), 4096, 65536]))

    status = post(daemon.client.app, endpoint, ordered, body, chunk=chunk)

    # Never 400: a stranger learns nothing about how the body would have been read.
    assert status in {401, 404, 413, 415}
    assert inbox_count(daemon.db) == 0


# -- 2. a real delivery with broken credentials is 401 (and the intact one is stored) ----------

SIGNED_BREAKAGES = (
    "another secret", "outside the time window", "body appended to", "body byte flipped",
    "id changed", "timestamp changed", "header missing", "v2 entry", "signature cut",
    "other endpoint",
)  # fmt: skip
TOKEN_BREAKAGES = ("wrong token", "no token", "token in another header", "other endpoint")


def _broken(
    kind: str, provider: str, headers: dict[str, str], body: bytes, data: st.DataObject
) -> tuple[str, dict[str, str], bytes]:
    """The endpoint, headers and body of a real delivery whose credentials ``kind`` broke."""
    prefix = FAMILY.get(provider, "")
    signature = headers.get(f"{prefix}-signature", "")
    if kind == "other endpoint":
        others = [p for p in ("auth0", "authjs", "stack") if p != provider]
        return data.draw(st.sampled_from(others)), headers, body
    if kind == "wrong token":
        return provider, {**headers, "authorization": data.draw(WRONG_TOKENS)}, body
    if kind == "no token":
        return provider, _without(headers, "authorization"), body
    if kind == "token in another header":
        moved = {**_without(headers, "authorization"), "x-authorization": headers["authorization"]}
        return provider, moved, body
    if kind == "another secret":
        return provider, _resigned(provider, body, secret=OTHER[provider]), body
    if kind == "outside the time window":  # the right secret, more than 5 minutes off
        skew = data.draw(st.integers(310, 10**8)) * data.draw(st.sampled_from([-1, 1]))
        when = datetime.now(UTC) + timedelta(seconds=skew)
        return provider, _resigned(provider, body, when=when), body
    if kind == "body appended to":
        return provider, headers, body + b" "
    if kind == "body byte flipped":
        at = data.draw(st.integers(0, len(body) - 1))
        return provider, headers, body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1 :]
    if kind == "id changed":
        return provider, {**headers, f"{prefix}-id": headers[f"{prefix}-id"] + "x"}, body
    if kind == "timestamp changed":
        stamp = str(int(headers[f"{prefix}-timestamp"]) - 1)
        return provider, {**headers, f"{prefix}-timestamp": stamp}, body
    if kind == "header missing":
        name = data.draw(st.sampled_from(["id", "timestamp", "signature"]))
        return provider, _without(headers, f"{prefix}-{name}"), body
    if kind == "v2 entry":
        return provider, {**headers, f"{prefix}-signature": signature.replace("v1,", "v2,")}, body
    assert kind == "signature cut"
    return provider, {**headers, f"{prefix}-signature": signature[:-4]}, body


def _resigned(provider: str, body: bytes, **kw: Any) -> dict[str, str]:
    return {"content-type": "application/json", **signed_headers(provider, body, **kw)}


def _without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


@fuzz(max(EXAMPLES // 2, 1))  # a narrower space: a dozen ways to break each provider
@given(data=st.data(), provider=PROVIDERS)
def test_a_real_delivery_with_broken_credentials_is_refused(
    daemon: Harness, data: st.DataObject, provider: str
) -> None:
    event = data.draw(st.sampled_from(simulate.EVENTS[provider]))
    headers, body = simulate.build(
        provider, event, email="fuzz@example.org", now=datetime.now(UTC),
        secret=SECRETS[provider],
    )  # fmt: skip
    kinds = TOKEN_BREAKAGES if provider == "auth0" else SIGNED_BREAKAGES
    kind = data.draw(st.sampled_from(kinds))
    endpoint, broken, tampered = _broken(kind, provider, dict(headers), body, data)
    before = inbox_count(daemon.db)

    status = post(daemon.client.app, endpoint, raw(broken), tampered, chunk=65536)

    assert status == 401
    assert inbox_count(daemon.db) == before
    # The control: the same delivery intact is stored, so the breakage was the reason.
    assert post(daemon.client.app, provider, raw(headers), body, chunk=65536) == 200
    assert inbox_count(daemon.db) > before


# -- 3. validly signed mutations are stored or 400, and draining them never crashes -------------


def _places(document: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) of a JSON document, depth first."""
    found: list[tuple[Any, Any]] = []
    pending = [document]
    while pending:
        node = pending.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node))
        for key in keys:
            found.append((node, key))
            if isinstance(node[key], dict | list):
                pending.append(node[key])
    return found


MUTATIONS = st.sampled_from(["retype"] * 4 + ["remove"] * 3 + ["add", "type", "type", "whole"])
# Values of the types the real fields hold (so a retyped field is often nearly right).
NEAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=30),
    st.sampled_from(["", "x" * 5000, "not an email", "2026-13-45T99:00:00Z", "-1", "{}"]),
    st.lists(st.text(max_size=5) | st.integers(), max_size=3),
    st.dictionaries(st.sampled_from(["id", "provider", "user_id", "email", "type"]),
                    st.text(max_size=10) | st.integers(), max_size=3),
)  # fmt: skip
# Where the payloads hold a user's id (test_an_over_long_user_id_fails_alone covers ids over
# the column's 255 characters).
ID_KEYS = frozenset({"id", "user_id", "userId", "sub"})


def _short_ids(document: Any) -> Any:
    """The document with every id-like value cut to 255 characters (see ID_KEYS)."""
    for node, key in _places(document) if isinstance(document, dict | list) else []:
        value = node[key]
        if key in ID_KEYS and isinstance(value, str | int) and len(str(value)) > 255:
            node[key] = str(value)[:255]
    return document


def _mutate(document: Any, data: st.DataObject) -> Any:
    """Fields removed, retyped or added anywhere in the document, or the event type swapped."""
    for _ in range(data.draw(st.integers(1, 3))):
        places = _places(document) if isinstance(document, dict | list) else []
        kind = data.draw(MUTATIONS)
        if kind == "whole" or not places:
            document = data.draw(JSON_VALUES)
            continue
        node, key = places[data.draw(st.integers(0, len(places) - 1))]
        if kind == "remove":
            del node[key]
        elif kind == "retype":
            node[key] = data.draw(NEAR | JSON_VALUES)
        elif kind == "add" and isinstance(node, dict):
            node[data.draw(st.text(max_size=10))] = data.draw(JSON_VALUES)
        elif kind == "type" and isinstance(document, dict):
            every = sorted({e for events in simulate.EVENTS.values() for e in events})
            document["type"] = data.draw(st.sampled_from([*every, "session", "team.created"]))
    return _short_ids(document)


RAW_BODIES = (
    st.binary(max_size=300)
    | JSON_VALUES.map(lambda v: json.dumps(_short_ids(v)).encode())
    | PATHOLOGICAL
)


def _encode(document: Any, data: st.DataObject) -> bytes:
    ascii_only = data.draw(st.booleans())
    text = json.dumps(document, ensure_ascii=ascii_only)  # NaN and Infinity as Python writes
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate as the bytes a sender sends


@fuzz(EXAMPLES)
@given(data=st.data(), provider=PROVIDERS)
def test_validly_signed_mutations_are_stored_or_400_and_drain_cleanly(
    daemon: Harness, data: st.DataObject, provider: str
) -> None:
    event = data.draw(st.sampled_from(simulate.EVENTS[provider]))
    email = data.draw(st.sampled_from(["fuzz@example.org", "other@example.org"]))
    skew = data.draw(st.integers(-250, 250))  # inside the ±5 min window
    _, real = simulate.build(
        provider, event, email=email, now=datetime.now(UTC), secret=SECRETS[provider]
    )
    how = data.draw(st.sampled_from(["intact", "mutated", "mutated", "raw"]))
    if how == "intact":
        body = real
    elif how == "mutated":
        body = _encode(_mutate(json.loads(real), data), data)
    else:
        body = data.draw(RAW_BODIES)
    when = datetime.now(UTC) + timedelta(seconds=skew)
    headers = signed_headers(provider, body, when=when)
    before = _rows(daemon.db)

    status = post(daemon.client.app, provider, raw(headers), body, chunk=4096)

    new = {i: r for i, r in _rows(daemon.db).items() if i not in before}
    if how == "intact":
        assert status == 200
    # Svix and Standard Webhooks verify text: a body that is not UTF-8 never verifies.
    not_text = provider in SIGNED and not _is_utf8(body)
    assert status in ({401} if not_text else {200, 400})
    if status != 200:
        assert new == {}
    else:  # a redelivery is 2xx and stores nothing
        assert post(daemon.client.app, provider, raw(headers), body, chunk=4096) == 200
        assert _rows(daemon.db).keys() == before.keys() | new.keys()
    daemon.drain()  # raises if drain_once lets anything out
    for row in _rows(daemon.db).values():
        assert row["status"] in FINISHED, row
        assert row["claimed_by"] is None, row  # every claim ended with an outcome


def _rows(db: Engine) -> dict[int, dict[str, Any]]:
    with db.connect() as conn:
        found = conn.execute(
            select(sync_inbox.c.id, sync_inbox.c.status, sync_inbox.c.claimed_by)
        ).mappings()
        return {r["id"]: dict(r) for r in found}


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- found by the fuzzing above, kept as plain regression tests ----------------------------------


@pytest.mark.parametrize(
    ("declared", "status"),
    [("\xb2", 401), ("1\xb3", 401), ("9" * 5000, 413), ("9" * 21, 413), (str(LIMIT), 401)],
    ids=["superscript two", "one superscript three", "5000 digits", "21 digits", "the limit"],
)
def test_an_odd_declared_length_is_never_a_500(daemon: Harness, declared: str, status: int) -> None:
    """str.isdigit() accepts digits int() refuses, and int() refuses 4,300 digits or more:
    both were 500s. A length not in ASCII digits is ignored (the body is read, and fails its
    signature here); one of more than 20 digits is over any limit."""
    headers = [(b"content-type", b"application/json"), (b"content-length",
               declared.encode("latin-1"))]  # fmt: skip
    assert post(daemon.client.app, "stack", headers, b"{}", chunk=65536) == status


@pytest.mark.parametrize("code", [[], {}, ["s"]], ids=["empty list", "object", "list"])
def test_an_auth0_log_whose_type_is_not_a_string_is_400(daemon: Harness, code: object) -> None:
    """The log planner looks the type up in sets: an unhashable one raised TypeError (500)."""
    body = json.dumps([{"log_id": "90020", "data": {"type": code, "user_id": "auth0|1"}}])
    headers = raw(signed_headers("auth0", body.encode()))
    assert post(daemon.client.app, "auth0", headers, body.encode(), chunk=65536) == 400
    assert inbox_count(daemon.db) == 0


def test_an_over_long_user_id_fails_alone(engine: Engine) -> None:
    """A validly signed Stack user whose id is over 255 characters fails on its own: the
    good delivery drained in the same batch is applied, and ``drain_once`` raises nothing
    (its failure's audit row holds the id cut to the column, on PostgreSQL too)."""
    daemon = harness(engine)
    now = datetime.now(UTC)
    good_headers, good = simulate.build(
        "stack", "user.created", email="good@example.org", now=now, secret=SECRETS["stack"]
    )
    document = json.loads(good)
    document["data"]["id"] = "x" * 300
    bad = json.dumps(document).encode()
    assert post(daemon.client.app, "stack", raw(good_headers), good, chunk=65536) == 200
    bad_headers = raw(signed_headers("stack", bad))
    assert post(daemon.client.app, "stack", bad_headers, bad, chunk=65536) == 200

    daemon.drain()

    first, second = daemon.inbox()
    assert (first["status"], second["status"]) == ("done", "failed")
    assert second["last_error"] == "external_id: longer than 255 characters"
    assert [u["email"] for u in rows(engine, "users")] == ["good@example.org"]
    assert [(a["action"], a["event_id"]) for a in audit(engine)] == [
        ("created", first["event_id"]),
        ("failed", second["event_id"]),
    ]
