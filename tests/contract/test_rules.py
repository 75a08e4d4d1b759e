"""The engine rules' tests, collected again under both paths (see conftest.py).

One transaction per batch with its cursor; nothing written for an unchanged record; the
version guard; field-level audit rows; poison isolation; linking by verified email;
tombstones and restore; stated fields; profile defaults; sessions (tests/test_engine.py,
test_engine_stated.py, test_engine_versions.py, test_engine_properties.py), and a pass of
each provider's pull (tests/test_backfill.py).
"""

from tests.test_backfill import *  # noqa: F403
from tests.test_engine import *  # noqa: F403
from tests.test_engine_properties import *  # noqa: F403
from tests.test_engine_stated import *  # noqa: F403
from tests.test_engine_versions import *  # noqa: F403
