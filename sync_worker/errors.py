"""The one error root of sync-worker, split by who must act.

    SyncWorkerError
    ├── ConfigError                 the operator: fix config.yaml or the environment (exit 2)
    ├── ProviderError               talking to an identity provider failed
    │   ├── ProviderAuthError       the operator: credentials rejected (401/403 after a refresh)
    │   ├── RateLimitedError        nobody: transient, retried with the provider's Retry-After
    │   ├── UpstreamUnavailable     nobody, then the operator: 5xx, timeouts, connection errors
    │   │   └── UpstreamStatusError     (providers.http) a 5xx, once its retries are spent
    │   ├── UpstreamDataError       the provider: a page or record we cannot parse
    │   └── HttpStatusError         (providers.http) any other 4xx: a request we got wrong
    ├── WebhookVerificationError    the sender: bad signature, stale timestamp, missing headers
    ├── WebhookPayloadError         the sender: a malformed body or an unknown shape (400)
    └── StoreError                  the database: driver errors translated at the db/ boundary
        ├── StoreUnavailable        nobody, then the operator: cannot connect, connection lost
        ├── RecordRefused           the data: a constraint or type the database refused (one
        │                           record; the engine isolates it and the batch goes on)
        └── GuardRefused            the operator: a safety guard (e.g. reconcile) refused to act

Driver and HTTP exceptions are translated once at each boundary (`raise ... from exc`);
code above the boundary only ever sees these.
"""

from __future__ import annotations


class SyncWorkerError(Exception):
    """Root of every error sync-worker raises on purpose."""


class ConfigError(SyncWorkerError):
    """Configuration is invalid; the message is one line naming the key."""


class ProviderError(SyncWorkerError):
    """Talking to an identity provider failed."""


class ProviderAuthError(ProviderError):
    """The provider rejected our credentials."""


class RateLimitedError(ProviderError):
    """The provider asked us to slow down (HTTP 429)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamUnavailable(ProviderError):
    """The provider is unreachable or failing (5xx, timeouts, connection errors)."""


class UpstreamDataError(ProviderError):
    """The provider sent a page or record we cannot understand."""


class WebhookVerificationError(SyncWorkerError):
    """A webhook failed signature or timestamp verification."""


class WebhookPayloadError(SyncWorkerError):
    """A verified webhook body is malformed or of a shape we do not know (HTTP 400).

    Also raised when a stored inbox payload cannot be turned into work (a poison row).
    Messages name the field, never its value.
    """


class StoreError(SyncWorkerError):
    """The worker's database failed."""


class StoreUnavailable(StoreError):
    """The database cannot be reached, or the connection was lost."""


class RecordRefused(StoreError):
    """The database refused a row (constraint, type); the message is its first line only."""


class GuardRefused(StoreError):
    """A safety guard refused an operation (e.g. reconcile would delete too much)."""
