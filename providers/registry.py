"""Building the configured provider adapters (the only place that knows all three)."""

from __future__ import annotations

from datetime import timedelta

from providers.auth0 import Auth0Provider
from providers.base import Provider
from providers.http import HttpPolicy
from sync_worker.config import Settings
from sync_worker.errors import ConfigError

NAMES = ("auth0", "stack", "authjs")
_ENV_HINT = {
    "auth0": "AUTH0_DOMAIN, AUTH0_CLIENT_ID and AUTH0_CLIENT_SECRET",
    "stack": "STACK_PROJECT_ID and STACK_SECRET_SERVER_KEY",
    "authjs": "AUTHJS_DATABASE_URL",
}


def build(name: str, settings: Settings) -> Provider:
    """The adapter for ``name``; ConfigError if it is unknown or not configured for pulls."""
    if name not in NAMES:
        raise ConfigError(f"--provider: unknown provider {name!r} (choose from {', '.join(NAMES)})")
    if not settings.provider(name).pull_enabled:
        raise ConfigError(f"providers.{name}: not configured for pulls (set {_ENV_HINT[name]})")
    batch = settings.sync.batch_size
    if name == "auth0":
        auth0 = settings.providers.auth0
        return Auth0Provider(auth0, policy=HttpPolicy.from_settings(auth0.http), batch_size=batch)
    if name == "stack":
        from providers.stack import StackProvider

        stack = settings.providers.stack
        return StackProvider(stack, policy=HttpPolicy.from_settings(stack.http), batch_size=batch)
    from providers.authjs import AuthjsProvider

    authjs = settings.providers.authjs
    return AuthjsProvider(
        authjs,
        session_max_age=timedelta(days=authjs.session_max_age_days),
        include_expired_sessions=authjs.include_expired_sessions,
    )
