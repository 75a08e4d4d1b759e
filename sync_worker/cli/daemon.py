"""The daemon's commands: run (serve, drain, schedule), replay (inbox rows) and simulate."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import structlog

from db.transaction import transaction
from providers import registry
from sync_worker import simulate
from sync_worker.changes import utcnow
from sync_worker.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Commands,
    command,
    open_database,
    timestamp,
)
from sync_worker.config import Settings
from sync_worker.errors import ConfigError

log = structlog.get_logger(__name__)


def register(commands: Commands) -> None:
    run = command(
        commands,
        "run",
        "the daemon: webhook server, inbox drainer and scheduler, in the foreground",
        cmd_run,
    )
    run.add_argument("--host", help="listen address (default server.host, $SYNC_WORKER_HOST)")
    run.add_argument("--port", type=int, help="listen port (default server.port, 8080)")
    run.add_argument(
        "--migrate", action="store_true", help="migrate the database first if it is behind"
    )
    replay = command(
        commands, "replay", "put failed or dead inbox rows back to pending", cmd_replay
    )
    replay.add_argument("--provider", choices=registry.NAMES, help="only this provider's rows")
    replay.add_argument(
        "--status", choices=["dead", "failed"], action="append", help="only rows in this status"
    )
    replay.add_argument("--id", type=int, action="append", dest="ids", help="only this row id")
    replay.add_argument("--since", type=timestamp, help="only rows received at or after (ISO)")
    sim = command(
        commands, "simulate", "build a realistic IdP event, sign it, post it to the daemon",
        cmd_simulate,
    )  # fmt: skip
    sim.add_argument("provider", choices=list(simulate.EVENTS), help="the sending IdP")
    sim.add_argument("event", help=_events_help())
    sim.add_argument("--url", help="the daemon's base URL (default: server.host and port)")
    sim.add_argument("--email", default="ada@example.org", help="the user's email")
    sim.add_argument("--count", type=int, default=1, help="how many events (distinct users)")


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    # Imported by the commands that use them: every command (a backfill too) starts here.
    from db.migrate import upgrade
    from sync_worker.daemon.server import build, serve

    host = args.host or settings.server.host
    port = args.port or settings.server.port
    with open_database(settings, require_head=not args.migrate) as db:
        if args.migrate:
            before, after = upgrade(db, settings.database.schema_)
            if before != after:
                log.info("database_migrated", before=before, after=after)
        secrets = _local_secrets(settings)
        daemon = build(settings, db, secrets)
        switched = registry.switched_on(settings, daemon.receivers)
        log.info("daemon_starting", host=host, port=port, providers=switched)
        _print_welcome(host, port, switched, local=bool(secrets))
        return serve(daemon, host, port, grace=settings.server.grace_seconds)


def _local_secrets(settings: Settings) -> dict[str, str]:
    """The embedded default's generated secrets, for endpoints without configured ones."""
    from sync_worker.daemon import local_secrets

    path = local_secrets.path_for(settings.database.url)
    if path is None:
        return {}
    generated = local_secrets.ensure(path)
    return {p: s for p, s in generated.items() if not registry.webhook_secrets(p, settings)}


def _print_welcome(
    host: str, port: int, switched: Mapping[str, Mapping[str, str]], *, local: bool
) -> None:
    lines = [f"sync-worker listening on http://{host}:{port}  (Ctrl-C stops it)"]
    for name, paths in switched.items():
        lines.append(f"  {name:<7} pull {paths['pull']}; webhook {paths['webhook']}")
    if local:
        lines.append("  local webhook secrets were generated for this embedded database;")
        lines.append("  try it from another terminal:  sync-worker simulate stack user.created")
        lines.append("                                  sync-worker status")
    print("\n".join(lines), flush=True)


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from db import inbox

    with open_database(settings) as db, transaction(db) as conn:
        count = inbox.replay(
            conn,
            now=utcnow(),
            provider=args.provider,
            statuses=tuple(args.status or ("dead", "failed")),
            ids=args.ids,
            since=args.since,
        )
    print(f"{count} inbox rows back to pending")
    return EXIT_OK


def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    if args.count < 1:
        raise ConfigError("--count: must be at least 1")
    secret = _sending_secret(settings, args.provider)
    base = args.url or f"http://{settings.server.host}:{settings.server.port}"
    url = simulate.endpoint(base, args.provider)
    worst = EXIT_OK
    for n in range(args.count):
        headers, body = simulate.build(
            args.provider, args.event, email=_nth(args.email, n), now=utcnow(), secret=secret
        )
        answer = simulate.post(url, headers, body)
        print(f"{args.provider} {args.event} -> {answer.status} {answer.body}")
        worst = max(worst, EXIT_OK if answer.status < 300 else EXIT_FAILURE)
    return worst


def _sending_secret(settings: Settings, provider: str) -> str:
    from sync_worker.daemon import local_secrets

    configured = registry.webhook_secrets(provider, settings)
    if configured:
        return " ".join(configured)
    path = local_secrets.path_for(settings.database.url)
    generated = local_secrets.load(path) if path is not None and path.exists() else {}
    if provider in generated:
        return generated[provider]
    env = registry.webhook_env(provider)
    raise ConfigError(f"providers.{provider}: no webhook secret to sign with (set {env})")


def _nth(email: str, n: int) -> str:
    if n == 0:
        return email
    local, _, domain = email.partition("@")
    return f"{local}+{n}@{domain}"


def _events_help() -> str:
    return "; ".join(f"{p}: {', '.join(events)}" for p, events in simulate.EVENTS.items())
