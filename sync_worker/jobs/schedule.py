"""When a job's ticks fall: pure functions of the job's schedule and the time.

Every instance must name a tick alike, or the ledger could not tell that two instances are
about to run the same one. Cron ticks are wall-clock times already; interval ticks are
aligned to the Unix epoch (``every: 5m`` ticks at :00, :05, ...), whenever each instance
started.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from sync_worker.config import JobSettings

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNITS = ((86400, "d"), (3600, "h"), (60, "m"), (1, "s"))


def interval_tick(now: datetime, every: timedelta) -> datetime:
    """The latest tick at or before ``now`` of a job run every ``every`` (epoch-aligned).
    Integer arithmetic on microseconds: no float rounding can split two instances."""
    return EPOCH + every * ((now - EPOCH) // every)


def next_interval_tick(now: datetime, every: timedelta) -> datetime:
    """The first tick strictly after ``now``."""
    return interval_tick(now, every) + every


def catch_up_tick(
    latest_due: datetime | None, last_claimed: datetime | None, now: datetime, grace: timedelta
) -> datetime | None:
    """The tick to run at start-up, or None.

    Ticks missed while every instance was down coalesce into the latest one due: it runs
    once now, unless some instance already claimed it (or a later one), or it is older than
    the misfire grace (a nightly job found down at noon waits for the next night).
    """
    if latest_due is None or now - latest_due > grace:
        return None
    if last_claimed is not None and last_claimed >= latest_due:
        return None
    return latest_due


@dataclass(frozen=True, slots=True)
class Schedule:
    """``every`` (an interval) or ``cron`` (five fields, UTC): exactly one is set."""

    every: timedelta | None = None
    cron: str | None = None

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise ValueError("a schedule has exactly one of every or cron")
        if self.every is not None and self.every <= timedelta(0):
            raise ValueError("every must be positive")

    @classmethod
    def of(cls, job: JobSettings) -> Schedule:
        every = timedelta(seconds=job.every) if job.every is not None else None
        return cls(every=every, cron=job.cron)

    def trigger(self) -> BaseTrigger:
        """The APScheduler trigger firing at exactly these ticks."""
        if self.every is not None:
            return IntervalTrigger(
                seconds=self.every.total_seconds(), start_date=EPOCH, timezone=UTC
            )
        assert self.cron is not None
        return CronTrigger.from_crontab(self.cron, timezone=UTC)

    def next_tick(self, now: datetime) -> datetime:
        """The first tick strictly after ``now``."""
        if self.every is not None:
            return next_interval_tick(now, self.every)
        fire: datetime = self.trigger().get_next_fire_time(None, now + timedelta(microseconds=1))
        return fire

    def latest_tick(self, now: datetime, *, within: timedelta) -> datetime | None:
        """The latest tick at or before ``now`` and no older than ``within``, or None."""
        if self.every is not None:
            tick = interval_tick(now, self.every)
            return tick if now - tick <= within else None
        trigger, latest = self.trigger(), None
        fire = trigger.get_next_fire_time(None, now - within)
        while fire is not None and fire <= now:
            latest = fire
            fire = trigger.get_next_fire_time(fire, fire)
        return latest

    def describe(self) -> str:
        if self.cron is not None:
            return f"cron {self.cron}"
        assert self.every is not None
        return f"every {duration_text(self.every)}"


def duration_text(span: timedelta) -> str:
    """``5m``, ``1h``, ``90s``: the largest unit that divides the span, as config reads it."""
    seconds = span.total_seconds()
    for size, unit in _UNITS:
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
