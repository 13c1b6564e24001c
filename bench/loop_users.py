"""Simulated users of the closed-loop benchmark: hidden ground truth, and how they react.

Each user has a **task stream** (tasks drawn, seeded, from a task set: ``bench.tasks``) and a hidden
**taste** for answer length. The benchmark's quality of an answer is the user's *reward*::

    reward = 0.7 * correct + 0.3 * length_fit                                     (in [0, 1])

* ``correct``     the task's check (``Task.is_correct``) on the answer text;
* ``length_fit``  a concise user wants at most ``CONCISE_WORDS`` words (fit falls linearly to 0 at
                  four times that); a thorough user wants at least ``THOROUGH_WORDS`` words (fit
                  rises linearly from 0).

Users react like people with a feedback UI (the probabilities are fields of ``Reactions``): often
nothing; when satisfied (reward >= 0.6) a thumbs up, a rating or an accept; when not, a thumbs
down, a rating, or a **regenerate** — they ask again, and then either state a pairwise preference
between the two answers or react to the second one. A user who got a wrong answer sometimes
**edits** it into the right one, in their own style (an implicit ``edit`` with the text). Ratings
carry N(0, 0.05) noise. Everything a user draws for their ``i``-th ask comes from
``Random(f"{seed}:{user}:{i}")`` in a fixed order, so every arm of the benchmark faces the same
users making the same choices in the same situations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from bench.tasks import Task

CORRECT_WEIGHT = 0.7
CONCISE_WORDS = 8
THOROUGH_WORDS = 12
SATISFIED = 0.6


def length_fit(text: str, concise: bool) -> float:
    words = len(text.split())
    if concise:
        return max(0.0, min(1.0, 1.0 - (words - CONCISE_WORDS) / (3.0 * CONCISE_WORDS)))
    return max(0.0, min(1.0, words / THOROUGH_WORDS))


def reward(task: Task, text: str, concise: bool) -> float:
    return CORRECT_WEIGHT * float(task.is_correct(text)) + (1.0 - CORRECT_WEIGHT) * length_fit(text, concise)


def ideal_answer(task: Task, concise: bool) -> str:
    """What the user would have liked to read (the text of an ``edit``)."""
    return task.answer if concise else f"The answer is {task.answer}. I checked it carefully before answering."


@dataclass(frozen=True)
class Reactions:
    p_silent: float = 0.45
    """Share of answers that get no feedback at all."""
    p_regenerate: float = 0.4
    """When unsatisfied and not silent: ask again."""
    p_pairwise_after_regenerate: float = 0.5
    p_edit: float = 0.2
    """When the answer was wrong and the user reacts: also send the answer they wanted."""
    rating_noise: float = 0.05


@dataclass(frozen=True)
class Verdict:
    """What a user does after reading one answer."""

    feedback: dict[str, Any] | None
    """Body for ``POST /v1/feedback`` (``request_id`` filled in), or None."""
    regenerate: bool = False
    edit: dict[str, Any] | None = None
    """A second feedback body (the implicit edit), or None."""


@dataclass(frozen=True)
class LoopUser:
    user_id: str
    concise: bool
    tasks: tuple[Task, ...]
    seed: int
    reactions: Reactions = field(default_factory=Reactions)

    def rng(self, step: int, stage: str) -> random.Random:
        return random.Random(f"{self.seed}:{self.user_id}:{step}:{stage}")

    def reward(self, task: Task, text: str) -> float:
        return reward(task, text, self.concise)

    def react(self, step: int, task: Task, request_id: str, text: str, second: bool = False) -> Verdict:
        """The reaction to the answer of ask ``step`` (``second``: the regenerated answer)."""
        rng = self.rng(step, "second" if second else "first")
        draws = [rng.random() for _ in range(4)]
        noise = rng.gauss(0.0, self.reactions.rating_noise)
        value = self.reward(task, text)
        if draws[0] < self.reactions.p_silent:
            return Verdict(None)
        satisfied = value >= SATISFIED
        edit = None
        if not task.is_correct(text) and draws[3] < self.reactions.p_edit:
            edit = {"request_id": request_id, "kind": "implicit",
                    "implicit": {"signal": "edit", "edited_text": ideal_answer(task, self.concise), "dwell_ms": None}}
        if not satisfied and not second and draws[1] < self.reactions.p_regenerate:
            return Verdict({"request_id": request_id, "kind": "implicit",
                            "implicit": {"signal": "regenerate", "edited_text": None, "dwell_ms": None}},
                           regenerate=True, edit=edit)
        kind = draws[2]
        if kind < 0.4:
            body: dict[str, Any] = {"request_id": request_id, "kind": "thumbs", "thumbs_up": satisfied}
        elif kind < 0.7:
            body = {"request_id": request_id, "kind": "rating", "rating": round(min(1.0, max(0.0, value + noise)), 3)}
        else:
            signal = "accept" if satisfied else "regenerate"
            body = {"request_id": request_id, "kind": "implicit",
                    "implicit": {"signal": signal, "edited_text": None, "dwell_ms": None}}
        return Verdict(body, edit=edit)

    def compare(self, step: int, task: Task, first: tuple[str, str, str], second: tuple[str, str, str]
                ) -> dict[str, Any] | None:
        """A pairwise preference between (request id, model, text) of the first and regenerated
        answers, or None when the user reacts to the second answer alone instead."""
        rng = self.rng(step, "compare")
        if rng.random() >= self.reactions.p_pairwise_after_regenerate:
            return None
        ra, rb = self.reward(task, first[2]), self.reward(task, second[2])
        winner = "tie" if abs(ra - rb) < 1e-9 else ("a" if ra > rb else "b")
        return {"request_id": first[0], "kind": "pairwise",
                "pairwise": {"request_id_a": first[0], "model_a": first[1],
                             "request_id_b": second[0], "model_b": second[1], "winner": winner}}


def make_users(tasks: list[Task], users: int, requests: int, seed: int) -> list[LoopUser]:
    """``users`` users sharing ``requests`` asks (as evenly as possible); half of them concise.

    Each user's stream is drawn with replacement from the whole task set (uniform over topics,
    then over the topic's tasks), so users ask about every topic and tasks recur across users
    and time, as questions do in real traffic."""
    if users < 1 or requests < users:
        raise ValueError(f"need users >= 1 and requests >= users; got users={users} requests={requests}")
    by_topic: dict[str, list[Task]] = {}
    for t in tasks:
        by_topic.setdefault(t.topic, []).append(t)
    names = sorted(by_topic)
    rng = random.Random(f"loop-users:{seed}")
    tastes = [i % 2 == 0 for i in range(users)]
    rng.shuffle(tastes)
    out = []
    for i in range(users):
        n = requests // users + (1 if i < requests % users else 0)
        stream = tuple(rng.choice(by_topic[rng.choice(names)]) for _ in range(n))
        out.append(LoopUser(f"loop-user-{i}", tastes[i], stream, seed))
    return out
