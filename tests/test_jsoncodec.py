"""JSON columns are encoded by orjson with a standard-library fallback (db.jsoncodec)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from types import MappingProxyType

from sqlalchemy import Engine

from db import jsoncodec
from sync_worker.changes import Source
from sync_worker.engine import PlanSettings
from tests.factories import BoundEngine, rows, upsert

ODD = {
    "seen": datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC),
    "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "view": MappingProxyType({"a": 1}),
    "tags": frozenset({"b", "a"}),
    "pair": ("x", 1),
    7: "int key",
}
ODD_AS_JSON = {
    "seen": "2026-01-02T03:04:05.600000+00:00",
    "id": "12345678-1234-5678-1234-567812345678",
    "view": {"a": 1},
    "tags": ["a", "b"],
    "pair": ["x", 1],
    "7": "int key",
}


def test_values_json_lacks_are_rendered_as_before() -> None:
    assert json.loads(jsoncodec.dumps_text(ODD)) == ODD_AS_JSON
    assert json.loads(jsoncodec.dumps_bytes(ODD)) == ODD_AS_JSON


def test_integers_beyond_64_bits_take_the_standard_library_path() -> None:
    big = {"n": 2**70, "when": datetime(2026, 1, 1, tzinfo=UTC)}
    assert jsoncodec.loads(jsoncodec.dumps_bytes(big)) == {
        "n": 2**70,
        "when": "2026-01-01T00:00:00+00:00",
    }
    assert jsoncodec.loads(jsoncodec.dumps_text(big))["n"] == 2**70


def test_non_ascii_is_written_as_utf8() -> None:
    assert jsoncodec.dumps_bytes({"name": "Zoë 東京"}) == '{"name":"Zoë 東京"}'.encode()


def test_loads_reads_what_the_standard_library_wrote() -> None:
    assert str(jsoncodec.loads('{"x": NaN}')["x"]) == "nan"


def test_raw_records_of_any_shape_are_stored(engine: Engine) -> None:
    # Upstream records are JSON objects, so their keys are strings (the content hash needs that).
    raw = {**{k: v for k, v in ODD.items() if isinstance(k, str)}, "huge": 2**70, "name": "Zoë"}
    result = BoundEngine(engine, PlanSettings()).apply(
        [upsert("auth0|odd", raw=raw)], source=Source.CLI
    )
    assert result.counts == {"created": 1}
    (identity,) = rows(engine, "user_identities")
    expected = {k: v for k, v in ODD_AS_JSON.items() if k != "7"}
    assert identity["raw"] == {**expected, "huge": 2**70, "name": "Zoë"}
