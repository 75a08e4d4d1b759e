from sync_worker.cli import console

# Guarded: the drainer's child process (multiprocessing, spawn) imports the parent's main
# module, and must not run the command line again.
if __name__ == "__main__":
    raise SystemExit(console())
