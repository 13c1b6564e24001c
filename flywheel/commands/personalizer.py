"""``flywheel personalizer``: run the ASLS personalisation agent, or roll a user's adapter back.

    flywheel personalizer                          # the agent (FLYWHEEL_PERSONALIZER_* settings)
    flywheel personalizer history USER             # every adapter version announced for USER
    flywheel personalizer rollback USER [--to N]   # announce version N's adapter again (0: base model)
"""

from __future__ import annotations

import argparse
import asyncio
import json

from infra.settings import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action")
    history = sub.add_parser("history", help="list a user's adapter versions")
    history.add_argument("user")
    rollback = sub.add_parser("rollback", help="serve an earlier adapter (or the base model) to a user")
    rollback.add_argument("user")
    rollback.add_argument("--to", type=int, default=None,
                          help="version to restore (default: the one before the current; 0 = base model)")


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    if getattr(args, "action", None) in ("history", "rollback"):
        from flywheel.personalizer_admin import history, rollback

        if args.action == "history":
            print(json.dumps(asyncio.run(history(settings, args.user)), indent=2))
            return 0
        print(json.dumps(asyncio.run(rollback(settings, args.user, args.to)), indent=2))
        return 0
    from agents.personalizer import main

    return main(settings)
