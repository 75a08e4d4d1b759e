"""The profile-sync engine: validate → load (db.snapshot) → plan (pure) → write (db.writes)."""

from sync_worker.engine.apply import BatchResult, Rejected, SyncEngine, plan_settings
from sync_worker.engine.plan import Outcome, PlanSettings

__all__ = ["BatchResult", "Outcome", "PlanSettings", "Rejected", "SyncEngine", "plan_settings"]
