"""``flywheel chaos [--json]``: faults x runs, fuzzing, a load ramp and a memory soak.

Runs against the local broker and Postgres under FLYWHEEL_HOME (started if needed), in topics
under a fresh prefix. The full form takes about an hour; ``--quick`` is CI's short form.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import uuid
from typing import Any

from infra.runtime import run_async, setup_logging
from infra.settings import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=3, help="runs of every fault")
    parser.add_argument("--fuzz-cases", type=int, default=10_000)
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--rates", default="0.1,0.25,0.5,1,2,4", help="requests/s of the load ramp")
    parser.add_argument("--quick", action="store_true", help="1 run per fault, 1,000 fuzz cases, no load or soak")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: faults,learners,fuzz,load,soak")
    parser.add_argument("--faults", default="", help="comma-separated faults to run (default: every fault this "
                                                     "broker can take; leader_kill needs --brokers 3)")
    parser.add_argument("--engine", default="auto", choices=["auto", "torch", "echo"],
                        help="the chaos worker's engine (echo: the event plane without a model)")


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from flywheel.chaos.faults import available_faults, run_faults
    from flywheel.chaos.fuzz import fuzz_all
    from flywheel.chaos.load import LoadSystem, ramp, soak
    settings = get_settings()
    skip = set(filter(None, args.skip.split(",")))
    if args.quick:
        args.runs, args.fuzz_cases = 1, 1000
        skip |= {"load", "soak"}
    out: dict[str, Any] = {}
    faults = tuple(args.faults.split(",")) if args.faults else available_faults(settings)
    if "faults" not in skip:
        results = await run_faults(settings.model_copy(update={"topic_prefix": f"chaos{uuid.uuid4().hex[:6]}."}),
                                   faults, args.runs, args.engine)
        out["faults"] = {f: {"runs": sum(r.fault == f for r in results),
                             "lost": sum(r.lost for r in results if r.fault == f),
                             "duplicated": sum(r.duplicated for r in results if r.fault == f),
                             "feedback_lost": sum(r.feedback_lost for r in results if r.fault == f),
                             "overspent": sum(r.overspent for r in results if r.fault == f),
                             "ratings_match_replay": all(r.ratings_match_replay for r in results if r.fault == f),
                             **({"resume_s": [round(r.resume_s or 0, 2) for r in results if r.fault == f],
                                 "feedback_resume_s": [round(r.feedback_resume_s or 0, 2)
                                                       for r in results if r.fault == f]}
                                if any(r.resume_s is not None for r in results if r.fault == f) else {})}
                         for f in faults}
    if "learners" not in skip:  # the trainer killed mid-iteration, the personaliser mid-update
        from flywheel.chaos.faults import LEARNER_FAULTS, run_learner_faults

        learned = await run_learner_faults(
            settings.model_copy(update={"topic_prefix": f"learn{uuid.uuid4().hex[:6]}."}), LEARNER_FAULTS, args.runs)
        out["learner_faults"] = {f: {"runs": sum(r.fault == f for r in learned),
                                     "lost": sum(r.lost for r in learned if r.fault == f),
                                     "duplicated": sum(r.duplicated for r in learned if r.fault == f),
                                     "half_written": sum(r.half_written for r in learned if r.fault == f),
                                     "killed_mid_work": sum(r.killed_mid_work for r in learned if r.fault == f),
                                     "notes": [n for r in learned if r.fault == f for n in r.notes]}
                                 for f in LEARNER_FAULTS}
    if "fuzz" not in skip:
        fuzz = await asyncio.to_thread(fuzz_all, args.fuzz_cases)
        out["fuzz"] = {"cases": fuzz["cases"], "crashes": fuzz["crashes"]}
    if not {"load", "soak"} <= skip:
        system = LoadSystem(settings.model_copy(update={"topic_prefix": f"load{uuid.uuid4().hex[:6]}."}))
        await system.start()
        try:
            if "load" not in skip:
                steps, best = await ramp(system, tuple(float(r) for r in args.rates.split(",")))
                out["load"] = [dataclasses.asdict(s) | {"within_slo": s.within_slo} for s in steps]
                out["max_rate_within_slo"] = best
            if "soak" not in skip:
                out["soak"] = await soak(system, max(0.05, out.get("max_rate_within_slo", 0.2) / 2),
                                         args.soak_minutes)
        finally:
            await system.stop()
    return out


def run(args: argparse.Namespace) -> int:
    setup_logging("WARNING" if args.json else get_settings().log_level)
    from infra.services import local_services

    with local_services(get_settings()):
        result = run_async(_run(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    faults_ok = all(v["lost"] == 0 and v["duplicated"] == 0 for v in result.get("faults", {}).values())
    faults_ok = faults_ok and all(v["lost"] == 0 and v["duplicated"] == 0 and v["half_written"] == 0
                                  for v in result.get("learner_faults", {}).values())
    return 0 if faults_ok and result.get("fuzz", {}).get("crashes", 0) == 0 else 1
