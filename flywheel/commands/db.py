"""``flywheel db start|stop|status|migrate``: the embedded Postgres and the migrations."""

from __future__ import annotations

import argparse

from infra.connect import database_url
from infra.db import create_pool, migrate
from infra.embedded_pg import EmbeddedPostgres
from infra.runtime import run_async, setup_logging
from infra.settings import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status", "migrate"])


async def _migrate(url: str) -> list[str]:
    pool = await create_pool(url, max_size=1)
    try:
        async with pool.acquire() as conn:
            return await migrate(conn)
    finally:
        await pool.close()


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    setup_logging(settings.log_level)
    server = EmbeddedPostgres(settings.home, settings.postgres_port)
    if args.action == "start":
        print(f"embedded PostgreSQL running at {server.start()}")
        return 0
    if args.action == "stop":
        print("stopped" if server.stop() else "not running")
        return 0
    if args.action == "status":
        status = server.status()
        print(f"running (pid {status.pid}) at {status.url}" if status.running else "not running")
        return 0 if status.running else 1
    applied = run_async(_migrate(database_url(settings)))
    print(f"applied: {', '.join(applied)}" if applied else "database is up to date")
    return 0
