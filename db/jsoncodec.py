"""JSON for the JSON/JSONB columns: orjson, with the standard library as the fallback.

Encoding raw upstream records and audit diffs with ``json.dumps`` (after a pass that made
them JSON-safe) was a fifth of a bulk load's CPU time; orjson renders them as they come,
several times faster. Values JSON has no form for are rendered as the planner used to
render them: datetimes in ISO 8601, UUIDs and other objects as strings, mappings as
objects, sets as sorted arrays. Integers beyond 64 bits, which orjson refuses, take the
standard library's path, so a record is never refused for its encoding alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Set
from datetime import date, datetime
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS


def _default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, Set):
        return sorted(value, key=str)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def dumps_bytes(value: Any) -> bytes:
    """UTF-8 JSON: what psycopg sends for JSONB."""
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except TypeError:
        return _stdlib_dumps(value).encode()


def dumps_text(value: Any) -> str:
    """JSON text: what SQLite stores."""
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS).decode()
    except TypeError:
        return _stdlib_dumps(value)


def loads(data: str | bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # e.g. NaN, which the standard library writes and reads
        return json.loads(data)


def _stdlib_dumps(value: Any) -> str:
    return json.dumps(value, default=_default, ensure_ascii=False, separators=(",", ":"))
