"""Building the configured provider adapters (the only place that knows all three)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from providers.base import Provider, UserLookup
from providers.webhook import WebhookReceiver, WorkDecoder, secrets_from
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
    # Each adapter is imported when built: an Auth.js run loads no HTTP client library.
    batch = settings.sync.batch_size
    if name == "auth0":
        from providers.auth0 import Auth0Provider
        from providers.http import HttpPolicy

        auth0 = settings.providers.auth0
        return Auth0Provider(auth0, policy=HttpPolicy.from_settings(auth0.http), batch_size=batch)
    if name == "stack":
        from providers.http import HttpPolicy
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


# -- the daemon's side: webhook receivers, payload decoders, user lookups -----------------

_WEBHOOK_ENV = {
    "auth0": "AUTH0_WEBHOOK_TOKEN",
    "stack": "STACK_WEBHOOK_SECRET",
    "authjs": "AUTHJS_WEBHOOK_SECRET",
}


def webhook_env(name: str) -> str:
    """The environment variable holding a provider's webhook secret (for messages)."""
    return _WEBHOOK_ENV[name]


def webhook_secrets(name: str, settings: Settings) -> tuple[str, ...]:
    """The configured secrets (or tokens) of a provider's endpoint; several during rotation."""
    providers = settings.providers
    value = {
        "auth0": providers.auth0.webhook_token,
        "stack": providers.stack.webhook_secret,
        "authjs": providers.authjs.webhook_secret,
    }[name]
    return secrets_from(value)


def receivers(settings: Settings, *, local: Mapping[str, str]) -> dict[str, WebhookReceiver]:
    """The endpoints that are on: those with a configured secret, else a ``local`` one (the
    embedded default's generated secrets). Each provider's verification needs its own."""
    found: dict[str, WebhookReceiver] = {}
    for name in NAMES:
        secrets = webhook_secrets(name, settings) or secrets_from(local.get(name))
        if secrets:
            found[name] = _receiver(name, secrets, settings)
    return found


def _receiver(name: str, secrets: tuple[str, ...], settings: Settings) -> WebhookReceiver:
    if name == "auth0":
        from providers.auth0_webhook import Auth0WebhookReceiver

        return Auth0WebhookReceiver(secrets)
    if name == "stack":
        from providers.stack_webhook import StackWebhookReceiver

        return StackWebhookReceiver(secrets)
    from providers.authjs_webhook import AuthjsWebhookReceiver

    max_age = timedelta(days=settings.providers.authjs.session_max_age_days)
    return AuthjsWebhookReceiver(secrets, session_max_age=max_age)


def decoders(settings: Settings) -> dict[str, WorkDecoder]:
    """Every provider's payload decoder: stored rows are drained even once an endpoint is
    turned off (a secret removed), and decoding needs no secret."""
    from providers import auth0_webhook, authjs_webhook, stack_webhook

    max_age = timedelta(days=settings.providers.authjs.session_max_age_days)
    return {
        "auth0": auth0_webhook.Auth0Decoder(),
        "stack": stack_webhook.StackDecoder(),
        "authjs": authjs_webhook.AuthjsDecoder(session_max_age=max_age),
    }


def lookups(settings: Settings) -> dict[str, UserLookup]:
    """Adapters that can re-read a user now: the providers configured for pulls."""
    found: dict[str, UserLookup] = {}
    for name in settings.enabled_providers():
        adapter = build(name, settings)
        assert isinstance(adapter, UserLookup)
        found[name] = adapter
    return found


def switched_on(settings: Settings, endpoints: Mapping[str, object]) -> dict[str, dict[str, str]]:
    """What the daemon logs at start: per provider, its pull and its endpoint, on or off."""
    pulls = set(settings.enabled_providers())
    return {
        name: {
            "pull": "on" if name in pulls else f"off (set {_ENV_HINT[name]})",
            "webhook": "on" if name in endpoints else f"off (set {_WEBHOOK_ENV[name]})",
        }
        for name in NAMES
    }
