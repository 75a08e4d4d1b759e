"""Scheduled jobs: what each job does (one module per concept), when it runs (``schedule``)
and how one tick runs exactly once across instances (``ticks``). The daemon's
``sync_worker.daemon.scheduler`` fires them."""
