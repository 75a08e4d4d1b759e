from sync_worker.cli import console

raise SystemExit(console())
