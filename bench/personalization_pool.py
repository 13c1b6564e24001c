"""Real SmolLM2 candidate responses for the personalisation benchmark, generated once and cached.

Generation is the slow part on CPU (tens of tokens per second), so every prompt gets a fixed pool
of candidates once, and the benchmark's serving step *ranks* that pool with the user's adapter
instead of generating. The candidates span the preference space: four system instructions
(short/long x formal/casual) sampled at temperature 0.8. The small model follows them loosely, so
the benchmark's users judge the text actually produced, never the instruction. Short candidates
are cut after their first sentence, long ones after their last complete sentence.

Cache: one JSON file (``candidates.json`` under the cache directory) mapping a key of (model,
instruction, seed, prompt) to the text; it grows as needed and is written after every batch, so
an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.simulated_users import Prompt

log = logging.getLogger(__name__)

STYLES: dict[str, tuple[str, int]] = {
    "short-formal": ("Reply in one brief, formal sentence.", 32),
    "short-casual": ("Reply in one brief, casual sentence, like texting a friend!", 32),
    "long-formal": ("Reply formally and in detail, in a few complete sentences.", 72),
    "long-casual": ("Reply in a relaxed, chatty, casual way, in a few sentences.", 72),
}
"""name -> (system instruction, max new tokens)."""
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def trim(text: str, style: str) -> str:
    text = text.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends:
        text = text[: ends[0]] if style.startswith("short") else text[: ends[-1]]
    return text.strip() or "I am not sure."


def _key(model: str, style: str, seed: int, prompt: str) -> str:
    return hashlib.sha256(f"{model}\0{style}\0{seed}\0{prompt}".encode()).hexdigest()[:24]


def end_ids(tokenizer: Any) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    ids.update(int(vocab[t]) for t in ("<|im_end|>", "<end_of_turn>") if t in vocab)
    return sorted(ids)


def candidate_pool(prompts: Sequence[Prompt], loaded: Any, cache_dir: Path, model_name: str, seed: int = 0,
                   batch_size: int = 40) -> dict[str, list[str]]:
    """prompt_id -> one candidate per style (in ``STYLES`` order), generating what is missing.

    ``loaded`` is needed only when something is missing: a zero-argument callable returning
    (model, tokenizer), so a warm cache never loads the model."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "candidates.json"
    entries: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [(style, p) for style in STYLES for p in prompts if _key(model_name, style, seed, p.text) not in entries]
    if missing:
        model, tokenizer = loaded()
        stop = end_ids(tokenizer)
        started = time.perf_counter()
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            by_style: dict[str, list[Prompt]] = {}
            for style, p in chunk:
                by_style.setdefault(style, []).append(p)
            for style, items in by_style.items():
                texts = _generate(model, tokenizer, style, items, stop, seed + start)
                for p, text in zip(items, texts, strict=True):
                    entries[_key(model_name, style, seed, p.text)] = trim(text, style)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
            tmp.replace(path)
            log.info("generated %d/%d candidates (%.0fs)", min(start + batch_size, len(missing)), len(missing),
                     time.perf_counter() - started)
    return {p.prompt_id: [entries[_key(model_name, style, seed, p.text)] for style in STYLES] for p in prompts}


@torch.no_grad()
def _generate(model: Any, tokenizer: Any, style: str, prompts: Sequence[Prompt], stop: list[int],
              seed: int) -> list[str]:
    instruction, max_new = STYLES[style]
    rendered = [tokenizer.apply_chat_template([{"role": "system", "content": instruction},
                                               {"role": "user", "content": p.text}],
                                              tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=max_new,
                         eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode([t for t in row.tolist() if t not in stop], skip_special_tokens=True) for row in new]
