"""``flywheel bench engine``: the CPU engine near its limit, per weight precision and batch size.

For each precision variant (``workers.engines.precision``) and batch size B, B requests decode
``--tokens`` steps together through the ``Engine`` interface; tokens/s = B x steps / time. Variants
are measured in interleaved rounds (every variant once per round, ``--rounds`` rounds; median and
min/max reported), because the machine is shared and its speed drifts.

The bound. Batch-B decode reads every weight once per step plus each row's KV window, so with a
read bandwidth of BW bytes/s no engine can exceed ``B * BW / (weight_bytes + B * kv_bytes)``
tokens/s. BW is measured here (a large tensor summed, single thread); ``fraction_of_bound`` is how
close each variant gets.

Quality. Each variant's next-token distribution is compared with fp32's, teacher-forced on fp32's
own greedy continuations of ``--quality-prompts`` prompts (so one early difference does not
cascade): top-1 agreement and mean KL(fp32 || variant). A variant is *within tolerance* when
top-1 agreement >= 0.95 and mean KL <= 0.01 nats (``tests/unit/engines/test_precision.py`` holds
the serving variants to the same bound). ``recommended`` is the fastest variant within tolerance
at batch 1 and at the largest batch; a variant that does not beat fp32 there is not recommended.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Any

from workers.engines.base import Engine, EngineRequest, SamplingParams

PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?")
QUALITY_PROMPTS = ("What is 12 times 7?", "Name three fruits and their colors.", PROMPT,
                   "Write a haiku about the sea.", "Explain in one sentence why the sky is blue.",
                   "List the first five prime numbers.")
TOP1_TOLERANCE = 0.95
KL_TOLERANCE = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("torch", "vllm"), default="torch")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default=None, help="torch engine device (default: cuda if available)")
    parser.add_argument("--variants", default="float32,bfloat16,int8-weight,int8",
                        help="torch precisions to compare (the first is the reference)")
    parser.add_argument("--batches", default="1,4,16,32")
    parser.add_argument("--tokens", type=int, default=16, help="decode steps timed per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lora", action="store_true",
                        help="also measure mixed batches where every other row uses a LoRA adapter")
    parser.add_argument("--quality-prompts", type=int, default=6)
    parser.add_argument("--quality-tokens", type=int, default=48)
    parser.add_argument("--quick", action="store_true", help="batches 1,8; 8 tokens; 1 round; 2 quality prompts")


def read_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Single-thread read bandwidth: a tensor far larger than any cache, summed (median of repeats)."""
    import torch

    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def make_lora_dir(model: Any, target: Any, last_layers: int = 2, seed: int = 0) -> Any:
    """A random (non-zero) LoRA adapter for ``model`` on its last layers, like the personaliser's."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = int(cfg.num_hidden_layers)
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=list(range(n - last_layers, n)),
        init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(target))
    return target


def decode_tokens_per_s(engine: Engine, batch: int, steps: int, tag: str, adapter: str | None = None) -> float:
    """Tokens/s of ``steps`` decode iterations with ``batch`` rows (prefill excluded); with an
    ``adapter``, every other row uses it (a mixed batch)."""
    ids = tuple(engine.encode_prompt(PROMPT))
    rids = [f"{tag}-{i}" for i in range(batch)]
    for i, rid in enumerate(rids):
        engine.submit(EngineRequest(rid, ids, SamplingParams(max_tokens=steps + 8, ignore_eos=True),
                                    adapter if i % 2 == 0 else None))
    engine.execute(rids)  # prefill
    engine.execute(rids)  # one warm decode step
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.execute(rids)
    secs = time.perf_counter() - t0
    for rid in rids:
        engine.release(rid)
    return batch * steps / secs


def _quality(reference: Any, variant: Any, sequences: list[tuple[list[int], int]], device: str) -> dict[str, Any]:
    import torch

    agree: list[float] = []
    kls: list[float] = []
    with torch.no_grad():
        for seq, prompt_len in sequences:
            ids = torch.tensor([seq], device=device)
            ref = torch.log_softmax(reference(ids).logits[0, prompt_len - 1:-1].float(), -1)
            got = torch.log_softmax(variant(ids).logits[0, prompt_len - 1:-1].float(), -1)
            agree.extend((ref.argmax(-1) == got.argmax(-1)).float().tolist())
            kls.extend((ref.exp() * (ref - got)).sum(-1).tolist())
    top1, kl = statistics.fmean(agree), statistics.fmean(kls)
    return {"top1_agreement": top1, "mean_kl": kl, "max_kl": max(kls),
            "within_tolerance": bool(top1 >= TOP1_TOLERANCE and kl <= KL_TOLERANCE)}


def _run_torch(args: argparse.Namespace, batches: list[int]) -> dict[str, Any]:
    import torch

    from models.loader import load_model
    from workers.engines.precision import weight_bytes
    from workers.engines.torch_engine import TorchEngine, encode_chat

    torch.set_num_threads(args.threads)
    device = args.device or "cpu"
    variants = args.variants.split(",")
    loaded = load_model(args.model, device=device)
    base = loaded.model
    engines: dict[str, TorchEngine] = {}
    wbytes: dict[str, int] = {}
    for v in variants:
        engine = TorchEngine(copy.deepcopy(base), loaded.tokenizer, args.model, device=device, dtype=v)
        engines[v] = engine
        wbytes[v] = weight_bytes(engine.model)
    # Quality: teacher-forced on fp32's greedy continuations.
    prompts = QUALITY_PROMPTS[: args.quality_prompts]
    sequences = []
    with torch.no_grad():
        for p in prompts:
            ids = encode_chat(loaded.tokenizer, p)
            out = base.generate(torch.tensor([ids], device=device), max_new_tokens=args.quality_tokens,
                                do_sample=False)
            sequences.append((out[0].tolist(), len(ids)))
    ref = variants[0]
    quality = {v: {"top1_agreement": 1.0, "mean_kl": 0.0, "max_kl": 0.0, "within_tolerance": True} if v == ref
               else _quality(engines[ref].model, engines[v].model, sequences, device) for v in variants}
    bandwidth = read_bandwidth_gbs() if device == "cpu" else float("nan")
    samples: dict[str, dict[int, list[float]]] = {v: {b: [] for b in batches} for v in variants}
    for r in range(args.rounds):
        for b in batches:
            for v in variants:  # interleaved: drift hits every variant alike
                samples[v][b].append(decode_tokens_per_s(engines[v], b, args.tokens, f"{v}-{b}-{r}"))
    lora: dict[str, dict[int, list[float]]] = {v: {b: [] for b in batches} for v in variants}
    if args.lora:  # last: peft wraps the models, which would slow the plain measurements too
        import tempfile
        from pathlib import Path

        adapter_dir = make_lora_dir(base, Path(tempfile.mkdtemp(prefix="bench-lora-")) / "adapter")
        for engine in engines.values():
            engine.load_adapter("bench-lora", str(adapter_dir))
        for r in range(args.rounds):
            for b in batches:
                for v in variants:
                    lora[v][b].append(decode_tokens_per_s(engines[v], b, args.tokens, f"l{v}-{b}-{r}", "bench-lora"))
    rows: dict[str, Any] = {}
    context = len(encode_chat(loaded.tokenizer, PROMPT)) + args.tokens // 2 + 1
    for v in variants:
        kv = engines[v].kv_bytes_per_token * context
        per_batch = {}
        for b in batches:
            med = statistics.median(samples[v][b])
            bound = b * bandwidth * 1e9 / (wbytes[v] + b * kv)
            per_batch[str(b)] = {"tokens_per_s": med, "min": min(samples[v][b]), "max": max(samples[v][b]),
                                 "over_reference": med / statistics.median(samples[ref][b]),
                                 "bound_tokens_per_s": bound, "fraction_of_bound": med / bound}
            if args.lora:
                per_batch[str(b)]["lora_mixed_tokens_per_s"] = statistics.median(lora[v][b])
        rows[v] = {"weight_bytes": wbytes[v], "per_batch": per_batch, "quality": quality[v]}
    recommended = {}
    for b in (batches[0], batches[-1]):
        ok = [v for v in variants if rows[v]["quality"]["within_tolerance"]]
        best = max(ok, key=lambda v: rows[v]["per_batch"][str(b)]["tokens_per_s"])
        recommended[f"batch_{b}"] = best if rows[best]["per_batch"][str(b)]["over_reference"] > 1.05 else ref
    return {"variants": rows, "read_bandwidth_gbs": bandwidth, "recommended": recommended,
            "tolerance": {"top1_agreement": f">= {TOP1_TOLERANCE}", "mean_kl": f"<= {KL_TOLERANCE}"},
            "kv_context_tokens": context}


def _run_vllm(args: argparse.Namespace, batches: list[int]) -> dict[str, Any]:
    from pathlib import Path

    from workers.engines.vllm_engine import VllmEngine

    engine = VllmEngine.from_catalog(args.model, Path(".flywheel/cache/engines"), gpu_memory_utilization=0.5)
    adapter = None
    if args.lora:
        import tempfile

        from models.loader import load_model

        adapter_dir = make_lora_dir(load_model(args.model).model, Path(tempfile.mkdtemp(prefix="bench-lora-")) / "a")
        engine.load_adapter("bench-lora", str(adapter_dir))
        adapter = "bench-lora"
    rows: dict[str, dict[str, float]] = {}
    for b in batches:
        rows[str(b)] = {"tokens_per_s": statistics.median(
            decode_tokens_per_s(engine, b, args.tokens, f"v{b}-{r}") for r in range(args.rounds))}
        if adapter:
            rows[str(b)]["lora_mixed_tokens_per_s"] = statistics.median(
                decode_tokens_per_s(engine, b, args.tokens, f"vl{b}-{r}", adapter) for r in range(args.rounds))
    return {"variants": {"vllm": {"per_batch": rows}}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.batches, args.tokens, args.rounds, args.quality_prompts = "1,8", 8, 1, 2
    batches = [int(b) for b in args.batches.split(",")]
    started = time.time()
    result = _run_vllm(args, batches) if args.engine == "vllm" else _run_torch(args, batches)
    for name, row in result["variants"].items():
        cells = "  ".join(f"B={b}: {r['tokens_per_s']:.1f}" for b, r in row["per_batch"].items())
        print(f"  {name:>12}  {cells}  tokens/s", file=sys.stderr, flush=True)
    return {**result, "engine": args.engine, "model": args.model, "threads": args.threads, "batches": batches,
            "tokens": args.tokens, "rounds": args.rounds, "wall_s": time.time() - started}


def main() -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
