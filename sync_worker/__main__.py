from sync_worker.cli import main

raise SystemExit(main())
