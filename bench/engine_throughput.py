"""Tokens/s per batch size for an engine, through the ``Engine`` interface (used by gpu_check.sh).

``python -m bench.engine_throughput --engine torch --device cuda --batches 1,8,32``

For each batch size B, B requests with the same GSM8K-style prompt generate exactly ``--tokens``
tokens each (``ignore_eos``), joining together; throughput is B * tokens over the wall time of
all iterations. A batch-invariance check then compares one greedy sequence alone and inside a
batch of 8 (on GPUs, kernels may legitimately differ in the last bits, so it is reported, not
asserted).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from workers.engines.base import Engine, EngineRequest, SamplingParams

PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?")


def _generate(engine: Engine, batch: int, tokens: int, tag: str) -> tuple[float, dict[str, list[int]]]:
    ids = tuple(engine.encode_prompt(PROMPT))
    rids = [f"{tag}-{i}" for i in range(batch)]
    for rid in rids:
        engine.submit(EngineRequest(rid, ids, SamplingParams(max_tokens=tokens, ignore_eos=True)))
    out: dict[str, list[int]] = {rid: [] for rid in rids}
    live = list(rids)
    t0 = time.perf_counter()
    while live:
        for rid, o in engine.execute(live).items():
            out[rid].extend(o.token_ids)
            if o.finished:
                engine.release(rid)
                live.remove(rid)
    return time.perf_counter() - t0, out


def measure(engine: Engine, batches: list[int], tokens: int) -> dict[str, object]:
    _generate(engine, 2, 8, "warmup")
    rows = {}
    for b in batches:
        secs, _ = _generate(engine, b, tokens, f"b{b}")
        rows[str(b)] = {"seconds": secs, "tokens_per_s": b * tokens / secs}
        print(f"  batch {b:>4}: {b * tokens / secs:9.1f} tokens/s  ({secs:.2f} s)", flush=True)
    _, alone = _generate(engine, 1, 32, "alone")
    _, crowd = _generate(engine, 8, 32, "crowd")
    same = sum(a == c for a, c in zip(alone["alone-0"], crowd["crowd-0"], strict=False)) / 32
    print(f"  greedy tokens identical alone vs in a batch of 8: {same:.0%}", flush=True)
    return {"per_batch": rows, "batch_invariance": same}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=("torch", "vllm"), default="torch")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None, help="torch engine device (default: cuda if available)")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--cache-dir", type=Path, default=Path(".flywheel/cache/engines"))
    args = ap.parse_args()
    engine: Engine
    t0 = time.perf_counter()
    if args.engine == "torch":
        from workers.engines.torch_engine import TorchEngine

        engine = TorchEngine.from_catalog(args.model, device=args.device)
    else:
        from workers.engines.vllm_engine import VllmEngine

        engine = VllmEngine.from_catalog(args.model, args.cache_dir, gpu_memory_utilization=0.5)
    print(f"{args.engine} engine, {args.model}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    result = measure(engine, [int(b) for b in args.batches.split(",")], args.tokens)
    print(json.dumps({"engine": args.engine, "model": args.model, **result}))


if __name__ == "__main__":
    main()
