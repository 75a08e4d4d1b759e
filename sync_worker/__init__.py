"""sync-worker: keeps an app's users and profiles in step with its identity provider."""

__version__ = "0.1.0"
