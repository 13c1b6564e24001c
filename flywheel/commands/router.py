"""``flywheel router``: run the router (requests -> routing decisions; FLYWHEEL_ROUTER_ALGORITHM picks the rule)."""

from __future__ import annotations

import argparse

from infra.settings import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # configured through FLYWHEEL_* settings only


def run(args: argparse.Namespace) -> int:
    from agents.router import main

    return main(get_settings())
