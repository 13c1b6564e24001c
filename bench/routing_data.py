"""RouteLLM's real per-prompt outcomes (MMLU, GSM8K) as arrays the routing benchmark can use.

Each data set becomes a :class:`RoutingData`: prompts, a group label (the MMLU subject; GSM8K has
one group), a ``(n, 2)`` 0/1 correctness matrix for (weak, strong) and a ``(n, 2)`` USD cost
matrix. Prompts listed in ``contaminated_prompts.jsonl`` are dropped, as RouteLLM does.

Costs use public list prices (USD per million tokens) and a 4-characters-per-token estimate:
gpt-4-1106-preview $10 in / $30 out; Mixtral-8x7B-Instruct $0.60 in / $0.60 out. MMLU answers
are one letter (1 output token); GSM8K output tokens come from each model's recorded answer.
A router cannot know the output length before answering, so ``expected_cost`` uses the
training split's mean output tokens per model; ``cost`` (realised) is what the metrics charge.

Embeddings are cached on disk keyed by the SHA-256 of the model name and the exact prompt
texts, so a changed data set never reuses stale vectors.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "routellm"
DEFAULT_CACHE_DIR = REPO_ROOT / ".flywheel" / "cache" / "routing"

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"
MODELS: tuple[str, str] = (WEAK, STRONG)
"""Column order of every (n, 2) matrix: index 0 is the weak model, 1 the strong one."""

PRICES_PER_MTOK: dict[str, tuple[float, float]] = {WEAK: (0.60, 0.60), STRONG: (10.0, 30.0)}
"""(input, output) USD per million tokens."""

CHARS_PER_TOKEN = 4.0
MMLU_OUTPUT_TOKENS = 1


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


@dataclass(frozen=True)
class RoutingData:
    name: str
    prompts: list[str]
    groups: np.ndarray
    """int group id per prompt (MMLU subject index; all zeros for GSM8K)."""
    group_names: list[str]
    correct: np.ndarray
    """(n, 2) float 0/1: did (weak, strong) answer correctly."""
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    """(n, 2) realised output tokens per model."""

    def __len__(self) -> int:
        return len(self.prompts)

    def cost(self) -> np.ndarray:
        """(n, 2) realised USD cost of sending each prompt to each model."""
        return _price(self.input_tokens, self.output_tokens)

    def expected_cost(self, train_index: np.ndarray) -> np.ndarray:
        """(n, 2) cost a router can know before answering: mean train output length per model."""
        mean_out = self.output_tokens[train_index].mean(axis=0)
        return _price(self.input_tokens, np.broadcast_to(mean_out, self.output_tokens.shape))


def _price(input_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
    price_in = np.array([PRICES_PER_MTOK[m][0] for m in MODELS])
    price_out = np.array([PRICES_PER_MTOK[m][1] for m in MODELS])
    cost: np.ndarray = (input_tokens[:, None] * price_in + output_tokens * price_out) / 1e6
    return cost


def _contaminated(path: Path) -> set[str]:
    if not path.exists():
        return set()
    with path.open() as fh:
        return {json.loads(line)["eval_prompt"] for line in fh if line.strip()}


def _as_bool(value: str) -> float:
    if value not in ("True", "False"):
        raise ValueError(f"expected True/False in a correctness column, got {value!r}")
    return 1.0 if value == "True" else 0.0


def load_mmlu(data_dir: Path) -> RoutingData:
    folder = data_dir / "mmlu"
    skip = _contaminated(folder / "contaminated_prompts.jsonl")
    prompts: list[str] = []
    groups: list[int] = []
    correct: list[tuple[float, float]] = []
    files = sorted(folder.glob("mmlu_*.csv"))
    if not files:
        raise FileNotFoundError(f"no mmlu_*.csv files in {folder}")
    names = [f.stem.removeprefix("mmlu_") for f in files]
    for gid, file in enumerate(files):
        with file.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row["prompt"] in skip:
                    continue
                prompts.append(row["prompt"])
                groups.append(gid)
                correct.append((_as_bool(row[WEAK]), _as_bool(row[STRONG])))
    n = len(prompts)
    return RoutingData(
        name="mmlu",
        prompts=prompts,
        groups=np.asarray(groups, dtype=np.int64),
        group_names=names,
        correct=np.asarray(correct, dtype=np.float64),
        input_tokens=np.asarray([estimate_tokens(p) for p in prompts], dtype=np.float64),
        output_tokens=np.full((n, 2), float(MMLU_OUTPUT_TOKENS)),
    )


def load_gsm8k(data_dir: Path) -> RoutingData:
    folder = data_dir / "gsm8k"
    skip = _contaminated(folder / "contaminated_prompts.jsonl")
    csv.field_size_limit(1 << 24)
    prompts: list[str] = []
    correct: list[tuple[float, float]] = []
    out_tokens: list[tuple[int, int]] = []
    with (folder / "gsm8k_responses.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["prompt"] in skip:
                continue
            prompts.append(row["prompt"])
            correct.append((_as_bool(row[WEAK]), _as_bool(row[STRONG])))
            out_tokens.append((estimate_tokens(row[f"{WEAK}_response"]),
                               estimate_tokens(row[f"{STRONG}_response"])))
    return RoutingData(
        name="gsm8k",
        prompts=prompts,
        groups=np.zeros(len(prompts), dtype=np.int64),
        group_names=["gsm8k"],
        correct=np.asarray(correct, dtype=np.float64),
        input_tokens=np.asarray([estimate_tokens(p) for p in prompts], dtype=np.float64),
        output_tokens=np.asarray(out_tokens, dtype=np.float64),
    )


def load_all(data_dir: Path) -> dict[str, RoutingData]:
    return {"mmlu": load_mmlu(data_dir), "gsm8k": load_gsm8k(data_dir)}


def cached_embeddings(data: RoutingData, cache_dir: Path) -> tuple[np.ndarray, float | None]:
    """(n, 384) prompt embeddings and the seconds spent embedding (``None`` when cached)."""
    from core.embedding import MODEL_NAME, get_embedder

    digest = hashlib.sha256(MODEL_NAME.encode())
    for prompt in data.prompts:
        digest.update(len(prompt).to_bytes(8, "big"))
        digest.update(prompt.encode())
    path = cache_dir / f"{data.name}-{digest.hexdigest()[:16]}.npy"
    if path.exists():
        vectors = np.load(path)
        if vectors.shape == (len(data), 384):
            return vectors, None
    import time

    start = time.perf_counter()
    vectors = get_embedder().embed(data.prompts)
    seconds = time.perf_counter() - start
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    tmp.rename(path)
    return vectors, seconds
