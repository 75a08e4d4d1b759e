"""Bring a database to the newest migration; safe to run any number of times.

Alembic is imported by ``upgrade`` alone: every command checks the revision before it
starts (``current_revision``, ``head_revision``), and Alembic's import (with Mako and
Pygments) cost a fifth of an unchanged Auth.js pass's whole process.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, column, inspect, select, table

from db.connect import ensure_schema
from db.errors import translated

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
VERSION_TABLE = "alembic_version"  # Alembic's default, in the worker's schema
_ASSIGNMENT = re.compile(r'^(revision|down_revision)\s*(?::[^=]*)?=\s*"([^"]+)"', re.MULTILINE)


def alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@translated
def upgrade(engine: Engine, schema: str) -> tuple[str | None, str]:
    """Migrate to head. Returns (revision before, revision after)."""
    from alembic import command

    ensure_schema(engine, schema)
    config = alembic_config()
    before = current_revision(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    return before, head_revision()


@translated
def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None before the first migration)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return None
        versions = table(VERSION_TABLE, column("version_num"))
        found = [str(v) for v in conn.execute(select(versions.c.version_num)).scalars()]
    if len(found) > 1:  # branches: this project has none, and must not grow any unnoticed
        raise RuntimeError(f"{VERSION_TABLE} holds several heads: {sorted(found)}")
    return found[0] if found else None


@cache
def head_revision() -> str:
    """The newest revision, read from the migration files' ``revision``/``down_revision``
    lines (tests/test_migrations.py checks it against Alembic's own answer)."""
    parents: dict[str, str | None] = {}
    for path in (MIGRATIONS / "versions").glob("*.py"):
        found = dict(_ASSIGNMENT.findall(path.read_text(encoding="utf-8")))
        if "revision" in found:
            parents[found["revision"]] = found.get("down_revision")
    heads = set(parents) - {p for p in parents.values() if p is not None}
    if len(heads) != 1:
        raise RuntimeError(f"migrations have {len(heads)} heads: {sorted(heads)}")
    return heads.pop()
