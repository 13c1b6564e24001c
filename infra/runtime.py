"""Process runtime helpers shared by every entry point: logging and the uvloop event loop."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiokafka", "faust", "mode", "httpx", "urllib3", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a uvloop event loop (every Flywheel entry point goes through here)."""
    import uvloop

    return uvloop.run(main)


def install_uvloop_policy() -> None:
    """For frameworks that create their own loop (faust): make asyncio hand out uvloop loops."""
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
