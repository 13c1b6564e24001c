"""``flywheel rewarder``: run the feedback-to-reward agent."""

from __future__ import annotations

import argparse

from infra.settings import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # configured through FLYWHEEL_* settings only


def run(args: argparse.Namespace) -> int:
    from agents.rewarder import main

    return main(get_settings())
