"""Driver errors, translated once into the project's own at the store boundary.

Every public store function is wrapped with ``translated``; above ``db/`` only the
``StoreError`` family (sync_worker.errors) is seen. Messages keep the first line of the
driver's text: later lines (DETAIL) can echo a row's values, which may be personal data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError

from sync_worker.errors import RecordRefused, StoreError, StoreUnavailable

P = ParamSpec("P")
T = TypeVar("T")


@contextmanager
def translating() -> Iterator[None]:
    """Re-raise driver errors as StoreError, StoreUnavailable or RecordRefused."""
    try:
        yield
    except (IntegrityError, DataError) as exc:
        raise RecordRefused(f"database refused the record: {first_line(exc)}") from exc
    except (OperationalError, InterfaceError) as exc:
        raise StoreUnavailable(f"database unavailable: {first_line(exc)}") from exc
    except DBAPIError as exc:
        raise StoreError(f"database error: {first_line(exc)}") from exc


def translated(function: Callable[P, T]) -> Callable[P, T]:
    """``translating()`` around a whole store function."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with translating():
            return function(*args, **kwargs)

    return wrapper


def first_line(exc: DBAPIError) -> str:
    text = str(exc.orig).strip() if exc.orig is not None else ""
    return text.splitlines()[0] if text else type(exc).__name__
