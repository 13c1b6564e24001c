"""The demo's workload: real prompts and simulated users who judge real answers.

Prompts are GSM8K questions and MT-Bench first turns from the RouteLLM data shipped in
``data/routellm`` (Apache-2.0, see its LICENSE). Each simulated user has a hidden taste, and
grades an answer the way a person would, with a bit of noise:

* a **math** question is judged on correctness: the reference answer is the last number of
  GPT-4's recorded answer where RouteLLM marks that answer correct, and the user checks whether
  the model's last number matches it;
* an **open** question is judged on length against the user's taste (concise users want at most
  ~40 words, thorough users at least ~60).

Feedback then takes the shapes the system understands: thumbs, ratings, implicit signals (accept
or regenerate) and, when the user saw two answers to the same prompt, a pairwise preference.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "routellm"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class DemoPrompt:
    text: str
    kind: str
    """``math`` (has a reference answer) or ``open``."""
    reference: str | None = None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def load_prompts(data_dir: Path = DATA_DIR, limit: int = 400, seed: int = 0) -> list[DemoPrompt]:
    prompts: list[DemoPrompt] = []
    with (data_dir / "gsm8k" / "gsm8k_responses.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["gpt-4-1106-preview"] == "True" and (ref := last_number(row["gpt-4-1106-preview_response"])):
                prompts.append(DemoPrompt(row["prompt"], "math", ref))
    with (data_dir / "mt_bench" / "question.jsonl").open() as fh:
        for line in fh:
            prompts.append(DemoPrompt(json.loads(line)["turns"][0], "open"))
    rng = random.Random(seed)
    rng.shuffle(prompts)
    math = [p for p in prompts if p.kind == "math"][: limit // 2]
    open_ = [p for p in prompts if p.kind == "open"][: limit // 2]
    mixed = math + open_
    rng.shuffle(mixed)
    return mixed


@dataclass(frozen=True)
class SimulatedUser:
    user_id: str
    concise: bool
    """Hidden taste for open questions."""
    noise: float = 0.1
    """Chance of a judgement flipping (people are not consistent)."""

    def grade(self, prompt: DemoPrompt, answer: str, rng: random.Random) -> float:
        """A score in [0, 1] for an answer (before noise)."""
        if prompt.kind == "math":
            score = 1.0 if last_number(answer) == prompt.reference else 0.0
        else:
            words = len(answer.split())
            score = (1.0 if words <= 40 else 0.3) if self.concise else (1.0 if words >= 60 else 0.3)
        if rng.random() < self.noise:
            score = 1.0 - score
        return score

    def feedback(self, prompt: DemoPrompt, answer: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """Feedback fields (for ``FlywheelClient.feedback``) on one answer."""
        score = self.grade(prompt, answer["text"], rng)
        base = {"user_id": self.user_id, "request_id": answer["request_id"], "model": answer["model"],
                "prompt": prompt.text}
        roll = rng.random()
        if roll < 0.4:
            return base | {"kind": "thumbs", "thumbs_up": score >= 0.5}
        if roll < 0.7:
            return base | {"kind": "rating", "rating": round(score, 3)}
        signal = "accept" if score >= 0.5 else "regenerate"
        return base | {"kind": "implicit", "implicit": {"signal": signal, "edited_text": None, "dwell_ms": None}}

    def compare(self, prompt: DemoPrompt, a: dict[str, Any], b: dict[str, Any], rng: random.Random
                ) -> dict[str, Any]:
        """A pairwise preference between two answers to the same prompt."""
        sa, sb = self.grade(prompt, a["text"], rng), self.grade(prompt, b["text"], rng)
        winner = "tie" if sa == sb else ("a" if sa > sb else "b")
        return {"user_id": self.user_id, "request_id": a["request_id"], "kind": "pairwise", "prompt": prompt.text,
                "pairwise": {"request_id_a": a["request_id"], "model_a": a["model"],
                             "request_id_b": b["request_id"], "model_b": b["model"], "winner": winner}}


def make_users(n: int, seed: int = 0) -> list[SimulatedUser]:
    rng = random.Random(seed)
    return [SimulatedUser(f"demo-user-{i}", concise=rng.random() < 0.5) for i in range(n)]
