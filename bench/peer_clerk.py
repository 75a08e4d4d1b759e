"""The peer that teams write today: Clerk's documented webhook pattern, for bench/ingest.py.

Clerk's guide to syncing users (clerk.com/docs/webhooks/sync-data): verify the Svix
signature, then write the user to the app's database inside the request, and answer 200.
Here that pattern for Stack's (Svix-signed) deliveries, served as the daemon is served
(``sync_worker.daemon.server.serve``: uvicorn with the same settings, the console script's
GC settings, ``db.connect.make_engine`` with the same pool): the ``svix`` package verifies
the raw body, then one transaction upserts the user (``INSERT ... ON CONFLICT``) and its
profile with SQLAlchemy Core on psycopg 3, in FastAPI's thread pool (as the daemon stores
its inbox rows), and the answer is 200.

Run: ``python bench/peer_clerk.py --port N --database-url postgresql://... --secret whsec_...``
(creates its two tables in the database's ``public`` schema if they are missing).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.concurrency import run_in_threadpool  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from sqlalchemy import (  # noqa: E402
    Boolean,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    MetaData,
    Table,
    Text,
    Uuid,
    delete,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, insert  # noqa: E402
from svix.webhooks import Webhook, WebhookVerificationError  # noqa: E402

from db.connect import make_engine  # noqa: E402
from sync_worker.runtime import tune_gc  # noqa: E402

metadata = MetaData()
users = Table(
    "users",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    Column("external_id", Text, nullable=False, unique=True),
    Column("email", Text),
    Column("email_verified", Boolean, nullable=False),
    Column("name", Text),
    Column("avatar_url", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
profiles = Table(
    "profiles",
    metadata,
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("display_name", Text),
    Column("avatar_url", Text),
    Column("timezone", Text, nullable=False),
    Column("settings", JSONB, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def create_app(db: Engine, secret: str) -> FastAPI:
    app = FastAPI(title="peer-clerk", docs_url=None, redoc_url=None, openapi_url=None)
    webhook = Webhook(secret)

    async def receive(request: Request) -> Response:
        body = await request.body()
        try:
            webhook.verify(body, dict(request.headers))
        except WebhookVerificationError:
            return JSONResponse({"error": "invalid signature"}, status_code=400)
        event = orjson.loads(body)
        await run_in_threadpool(apply, db, event)
        return JSONResponse({"ok": True})

    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.add_api_route("/webhooks/stack", receive, methods=["POST"])
    app.add_api_route("/healthz", healthz, methods=["GET"])
    return app


def apply(db: Engine, event: dict[str, Any]) -> None:
    """The user's row and profile, upserted in one transaction (Clerk's ``user.created`` /
    ``user.updated`` handler); ``user.deleted`` deletes."""
    data, kind = event["data"], event["type"]
    with db.begin() as conn:
        if kind == "user.deleted":
            conn.execute(delete(users).where(users.c.external_id == data["id"]))
            return
        if kind not in ("user.created", "user.updated"):
            return
        now = datetime.now(UTC)
        row = {
            "external_id": data["id"],
            "email": data.get("primary_email"),
            "email_verified": bool(data.get("primary_email_verified")),
            "name": data.get("display_name"),
            "avatar_url": data.get("profile_image_url"),
            "created_at": datetime.fromtimestamp(data["signed_up_at_millis"] / 1000, UTC),
            "updated_at": now,
        }
        upsert = insert(users).values(row)
        changed = {k: upsert.excluded[k] for k in row if k != "external_id"}
        user_id = conn.execute(
            upsert.on_conflict_do_update(
                index_elements=[users.c.external_id], set_=changed
            ).returning(users.c.id)
        ).scalar_one()
        client = data.get("client_metadata") or {}
        profile = {
            "user_id": user_id,
            "display_name": data.get("display_name"),
            "avatar_url": data.get("profile_image_url"),
            "timezone": client.get("timezone") or "UTC",
            "settings": client,
            "updated_at": now,
        }
        upsert = insert(profiles).values(profile)
        changed = {k: upsert.excluded[k] for k in profile if k != "user_id"}
        conn.execute(
            upsert.on_conflict_do_update(index_elements=[profiles.c.user_id], set_=changed)
        )


def count_users(db: Engine) -> tuple[int, int]:
    with db.connect() as conn:
        n_users = conn.execute(func.count().select().select_from(users)).scalar_one()
        n_profiles = conn.execute(func.count().select().select_from(profiles)).scalar_one()
    return int(n_users), int(n_profiles)


def main() -> None:
    parser = argparse.ArgumentParser(description="Clerk's webhook pattern (bench peer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True, help="postgresql://...")
    parser.add_argument("--secret", required=True, help="the Svix signing secret, whsec_...")
    parser.add_argument("--pool-size", type=int, default=5, help="database.pool_size's default")
    args = parser.parse_args()
    url = args.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    db = make_engine(url, schema="public", pool_size=args.pool_size)
    metadata.create_all(db)
    tune_gc()  # as the console script does for the daemon
    # The settings of sync_worker.daemon.server.serve: served the same way.
    config = uvicorn.Config(
        create_app(db, args.secret),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
