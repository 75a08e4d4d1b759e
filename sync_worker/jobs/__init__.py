"""Jobs: what each one does (one module per concept; ``maintenance`` and ``export`` are plain
functions the CLI calls too), when it runs (``schedule``) and how one tick runs exactly once
across instances (``ticks``). The daemon's ``sync_worker.daemon.scheduler`` fires them."""
