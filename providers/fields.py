"""Reading fields of raw upstream records, shared by the pure mappers of every adapter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def optional_text(record: Mapping[str, Any], key: str) -> str | None:
    """The string at ``key``; None when absent or empty; ValueError for any other type."""
    value = record.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {type(value).__name__}")
    return value
