"""Generated webhook secrets for the embedded default, so a try-out needs no set-up.

On the embedded SQLite database only, ``run`` turns on each webhook endpoint whose secret is
not configured with a secret of its own, kept in ``webhook-secrets.json`` beside the
database file (under ``var/`` by default), readable by its owner only; ``simulate`` signs
with it. Nothing is generated for any other database: a production endpoint is on only
with a secret from the environment.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path

from sqlalchemy.engine import make_url

from sync_worker.errors import ConfigError

FILE_NAME = "webhook-secrets.json"
PROVIDERS = ("auth0", "stack", "authjs")


def path_for(database_url: str) -> Path | None:
    """Where the embedded default keeps its secrets; None for any other database."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve().parent / FILE_NAME


def ensure(path: Path) -> dict[str, str]:
    """The secrets in ``path``, generated (owner-only) for any provider that has none yet."""
    current = load(path) if path.exists() else {}
    missing = [p for p in PROVIDERS if not current.get(p)]
    if not missing:
        return current
    current.update({p: _generate(p) for p in missing})
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(current, out, indent=2)
    os.replace(temporary, path)
    return current


def load(path: Path) -> dict[str, str]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the local webhook secrets") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the local webhook secrets are not a JSON object")
    return {str(k): str(v) for k, v in document.items() if k in PROVIDERS and v}


def _generate(provider: str) -> str:
    if provider == "auth0":  # a static Authorization value, as an Auth0 log stream sends
        return f"Bearer {secrets.token_urlsafe(32)}"
    # Svix and Standard Webhooks secrets: whsec_ and base64 of the key bytes
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
