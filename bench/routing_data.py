"""Routing data folders: per-prompt outcomes of any fleet, in one documented layout.

Layout (docs/bench/routing.md):

    DIR/
      models.json                  optional: {MODEL: {"input_per_mtok": $, "output_per_mtok": $,
                                                      "output_tokens": n}}
      SET/                         one subfolder per data set (sorted by name)
        TOPIC.csv                  one file per topic: `prompt`, then one column per model
        contaminated_prompts.jsonl optional: {"eval_prompt": ...} lines, dropped (RouteLLM's rule)

A model column holds 0/1, True/False (any case) or a score in [0, 1]. A column named
``<other column>_<suffix>`` (e.g. ``<model>_response``) is an extra and is ignored, except that a
``<model>_response`` text gives that row's output length. Subfolders without CSV files (RouteLLM's
``mt_bench``) are skipped. Every CSV of one set must name the same models. The topic of a row is
its file (``mmlu_<subject>`` in RouteLLM); routers are never told it, only the topic oracle uses it.

Costs: ``input_tokens * input_per_mtok + output_tokens * output_per_mtok`` (USD per million), with
tokens = characters / 4. Output tokens come from ``<model>_response`` when present, else from
``models.json``'s ``output_tokens``, else 1 (a one-letter answer). Without ``models.json`` the two
RouteLLM models get public list prices (gpt-4-1106-preview $10 / $30, Mixtral-8x7B $0.60 / $0.60)
and any other model $1 / $1. A router cannot know a row's output length before answering, so
``expected_cost`` uses the training split's mean output tokens per model; ``cost`` (realised) is
what the metrics charge.

Embeddings are cached per prompt text (SHA-256 of the text) in one file per embedding model, so a
changed, grown or regenerated data set embeds only its new prompts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "routellm"
DEFAULT_CACHE_DIR = REPO_ROOT / ".flywheel" / "cache" / "routing"

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"
ROUTELLM_PRICES_PER_MTOK: dict[str, tuple[float, float]] = {WEAK: (0.60, 0.60), STRONG: (10.0, 30.0)}
"""(input, output) USD per million tokens, used when a folder has no models.json."""
DEFAULT_PRICE_PER_MTOK = (1.0, 1.0)
CHARS_PER_TOKEN = 4.0
MIN_ROWS = 60
MAX_MODELS = 32

Embed = Callable[[list[str]], np.ndarray]
"""Texts -> (n, dim) unit-norm float32 vectors (the real one is ``core.embedding``'s MiniLM)."""


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


@dataclass(frozen=True)
class ModelPrice:
    input_per_mtok: float
    output_per_mtok: float
    output_tokens: float | None = None
    """Typical answer length; ``None`` = unknown (1 token unless responses are recorded)."""

    def __post_init__(self) -> None:
        if not (self.input_per_mtok >= 0 and self.output_per_mtok >= 0):
            raise ValueError(f"prices must be >= 0, got {self.input_per_mtok} / {self.output_per_mtok}")
        if self.output_tokens is not None and not self.output_tokens > 0:
            raise ValueError(f"output_tokens must be > 0, got {self.output_tokens}")


@dataclass(frozen=True)
class RoutingData:
    """One data set: ``correct[i, m]`` is model ``m``'s outcome on prompt ``i``, in [0, 1]."""

    name: str
    prompts: list[str]
    models: tuple[str, ...]
    groups: np.ndarray
    """Topic (file) index per row."""
    group_names: list[str]
    correct: np.ndarray
    """(n, K) float outcomes in [0, 1]."""
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    """(n, K) realised output tokens."""
    prices: np.ndarray
    """(K, 2) USD per million (input, output) tokens."""

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def k(self) -> int:
        return len(self.models)

    def prompt_ids(self) -> np.ndarray:
        """An id per distinct prompt text: rows sharing a prompt stay on one side of a split."""
        ids: dict[str, int] = {}
        return np.asarray([ids.setdefault(p, len(ids)) for p in self.prompts], dtype=np.int64)

    def cost(self) -> np.ndarray:
        """(n, K) realised USD cost of sending each prompt to each model."""
        return self._price(self.output_tokens)

    def expected_cost(self, train_index: np.ndarray) -> np.ndarray:
        """(n, K) cost a router can know before answering: mean train output length per model."""
        mean_out = self.output_tokens[train_index].mean(axis=0)
        return self._price(np.broadcast_to(mean_out, self.output_tokens.shape))

    def _price(self, output_tokens: np.ndarray) -> np.ndarray:
        cost: np.ndarray = (self.input_tokens[:, None] * self.prices[:, 0]
                            + output_tokens * self.prices[:, 1]) / 1e6
        return cost

    def subset(self, rows: np.ndarray, name: str | None = None) -> RoutingData:
        return RoutingData(name or self.name, [self.prompts[i] for i in rows.tolist()], self.models,
                           self.groups[rows], self.group_names, self.correct[rows], self.input_tokens[rows],
                           self.output_tokens[rows], self.prices)


def parse_outcome(value: str, where: str) -> float:
    text = value.strip().lower()
    if text in ("true", "false"):
        return 1.0 if text == "true" else 0.0
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{where}: expected 0/1, true/false or a score in [0, 1], got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{where}: score {number} is outside [0, 1]")
    return number


def read_prices(root: Path) -> dict[str, ModelPrice]:
    path = root / "models.json"
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object of models")
    out: dict[str, ModelPrice] = {}
    for model, spec in raw.items():
        try:
            out[model] = ModelPrice(float(spec["input_per_mtok"]), float(spec["output_per_mtok"]),
                                    float(spec["output_tokens"]) if spec.get("output_tokens") is not None else None)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: model {model!r} needs input_per_mtok and output_per_mtok ({exc})") from None
    return out


def _split_columns(header: list[str], where: str) -> tuple[list[str], set[str]]:
    if not header or header[0] != "prompt":
        raise ValueError(f"{where}: the first column must be 'prompt', got {header[:1]}")
    rest = header[1:]
    extras = {c for c in rest if any(c.startswith(o + "_") for o in rest if o != c)}
    models = [c for c in rest if c not in extras]
    if not models:
        raise ValueError(f"{where}: no model columns")
    return models, extras


def _contaminated(folder: Path) -> set[str]:
    path = folder / "contaminated_prompts.jsonl"
    if not path.exists():
        return set()
    with path.open() as fh:
        return {json.loads(line)["eval_prompt"] for line in fh if line.strip()}


def load_set(folder: Path, prices: dict[str, ModelPrice]) -> RoutingData:
    """One data set (a subfolder of CSV files, one per topic)."""
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no CSV files in {folder}")
    csv.field_size_limit(1 << 24)
    skip = _contaminated(folder)
    models: list[str] | None = None
    prompts: list[str] = []
    groups: list[int] = []
    correct: list[list[float]] = []
    out_tokens: list[list[float]] = []
    for gid, file in enumerate(files):
        with file.open(newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            file_models, extras = _split_columns(header, str(file))
            if models is None:
                models = file_models
            elif sorted(file_models) != sorted(models):
                raise ValueError(f"{file}: models {file_models} differ from {models} in the other files")
            col = {c: i for i, c in enumerate(header)}
            responses = {m: col[f"{m}_response"] for m in models if f"{m}_response" in extras}
            for line, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise ValueError(f"{file}:{line}: {len(row)} cells for {len(header)} columns")
                if row[0] in skip:
                    continue
                prompts.append(row[0])
                groups.append(gid)
                correct.append([parse_outcome(row[col[m]], f"{file}:{line} column {m!r}") for m in models])
                out_tokens.append([float(estimate_tokens(row[responses[m]])) if m in responses
                                   else _default_output(prices, m) for m in models])
    assert models is not None
    if len(models) > MAX_MODELS:
        raise ValueError(f"{folder}: {len(models)} models; at most {MAX_MODELS} are supported")
    if len(prompts) < MIN_ROWS:
        raise ValueError(f"{folder}: {len(prompts)} rows; the benchmark needs at least {MIN_ROWS}")
    price = np.asarray([_price_of(prices, m) for m in models], dtype=np.float64)
    return RoutingData(
        name=folder.name, prompts=prompts, models=tuple(models), groups=np.asarray(groups, dtype=np.int64),
        group_names=[f.stem for f in files], correct=np.asarray(correct, dtype=np.float64),
        input_tokens=np.asarray([estimate_tokens(p) for p in prompts], dtype=np.float64),
        output_tokens=np.asarray(out_tokens, dtype=np.float64), prices=price)


def _default_output(prices: dict[str, ModelPrice], model: str) -> float:
    spec = prices.get(model)
    return float(spec.output_tokens) if spec is not None and spec.output_tokens is not None else 1.0


def _price_of(prices: dict[str, ModelPrice], model: str) -> tuple[float, float]:
    if model in prices:
        return prices[model].input_per_mtok, prices[model].output_per_mtok
    return ROUTELLM_PRICES_PER_MTOK.get(model, DEFAULT_PRICE_PER_MTOK)


def load_folder(root: Path) -> dict[str, RoutingData]:
    """Every data set under ``root`` (subfolders with CSV files), by subfolder name."""
    if not root.is_dir():
        raise FileNotFoundError(f"routing data folder {root} does not exist")
    prices = read_prices(root)
    sets = {sub.name: load_set(sub, prices) for sub in sorted(root.iterdir())
            if sub.is_dir() and any(sub.glob("*.csv"))}
    if not sets:
        raise FileNotFoundError(f"{root} has no subfolder with CSV files (see docs/bench/routing.md)")
    return sets


def _key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:32]


def cached_embeddings(prompts: list[str], cache_dir: Path, embed: Embed | None = None,
                      model_name: str | None = None) -> tuple[np.ndarray, float | None]:
    """(n, dim) embeddings of ``prompts`` and the seconds spent on new ones (``None``: all cached).

    The cache maps SHA-256(prompt) -> vector, one file per embedding model; only prompts missing
    from it are embedded. ``embed`` defaults to the packaged MiniLM.
    """
    import time

    if embed is None:
        from core.embedding import MODEL_NAME

        model_name = MODEL_NAME
    tag = hashlib.sha256((model_name or "custom").encode()).hexdigest()[:12]
    path = cache_dir / f"prompt-embeddings-{tag}.npz"
    known: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path) as stored:
            known = dict(zip(stored["keys"].tolist(), stored["vectors"], strict=True))
    keys = [_key(p) for p in prompts]
    missing = list(dict.fromkeys(p for p, k in zip(prompts, keys, strict=True) if k not in known))
    seconds: float | None = None
    if missing:
        if embed is None:  # load the model only when something is missing
            from core.embedding import get_embedder

            embed = get_embedder().embed
        start = time.perf_counter()
        for i in range(0, len(missing), 1024):
            chunk = missing[i:i + 1024]
            for prompt, vector in zip(chunk, embed(chunk), strict=True):
                known[_key(prompt)] = np.asarray(vector, dtype=np.float32)
        seconds = time.perf_counter() - start
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.asarray(list(known)), vectors=np.stack(list(known.values())))
        tmp.rename(path)
    return np.stack([known[k] for k in keys]).astype(np.float32), seconds
