"""The ``retry`` job: inbox rows whose time has come go back to the drainer.

Failed rows whose ``next_attempt_at`` has come return to pending (the drainer would claim
them anyway; this makes the inbox's state say so and wakes this process's drainer), rows
whose last allowed lease ran out with no outcome are buried as dead, and ledger rows past
``LEDGER_RETENTION`` are purged: this job runs often, so each purge is small.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from db import inbox, ledger
from db.transaction import transaction
from sync_worker.config import Settings
from sync_worker.jobs.base import JobContext

#: how long the scheduler's ledger keeps a tick (status shows the latest of each job)
LEDGER_RETENTION = timedelta(days=30)


class RetryJob:
    name = lock = "retry"
    records_own_run = False

    def providers(self, settings: Settings) -> list[str | None]:
        return [None]

    def run(self, ctx: JobContext, provider: str | None) -> Mapping[str, int]:
        max_attempts = ctx.settings.drain.max_attempts
        with transaction(ctx.db) as conn:
            requeued = inbox.requeue_due(conn, now=ctx.now)
            buried = inbox.bury_abandoned(conn, now=ctx.now, max_attempts=max_attempts)
            purged = ledger.purge_ticks(conn, before=ctx.now - LEDGER_RETENTION)
        if requeued:
            ctx.wake_drainer()
        return {"requeued": requeued, "buried": buried, "ticks_purged": purged}
