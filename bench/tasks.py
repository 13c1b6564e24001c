"""Task sets with checkable answers: the hidden ground truth of the closed-loop benchmark's users.

Layout (documented for users in ``data/tasks/README.md``): a folder of JSONL files, any number,
any size; each line one task::

    {"prompt": str, "answer": str, "check": "exact"|"number"|"contains"|"choice", "topic": str}

Checks, all on normalised text (lower case, accents and surrounding punctuation removed, runs of
white space collapsed):

* ``exact``    the first non-empty line of the response equals the answer;
* ``number``   the last number in the response equals the answer numerically (GSM8K's rule;
               thousands separators ignored);
* ``contains`` the answer occurs in the response as a whole word or phrase;
* ``choice``   the answer is an option letter: the letter the response picks (``answer is B``,
               ``B)`` or ``(B)``, or a response that starts with ``B`` / ``B.``) equals it; a
               response that picks no letter is right when it names the text of the correct option
               and of no other (options are read from the prompt's ``X) text`` lines).

Pure functions; a malformed file raises ``TaskFormatError`` naming the file, line and field.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CHECKS = ("exact", "number", "contains", "choice")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_OPTION_LINE = re.compile(r"^\s*\(?([A-Ha-h])[).:]\s+(.+?)\s*$", re.MULTILINE)


class TaskFormatError(ValueError):
    """A task file breaks the documented layout."""


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: str
    check: str
    topic: str

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"check must be one of {CHECKS}, got {self.check!r}")
        if not self.prompt.strip() or not self.answer.strip() or not self.topic.strip():
            raise ValueError("prompt, answer and topic must be non-empty")
        if self.check == "number" and parse_number(self.answer) is None:
            raise ValueError(f"a number task needs a numeric answer, got {self.answer!r}")

    def is_correct(self, response: str) -> bool:
        return check(self.check, self.answer, response, self.prompt)


def load_tasks(folder: Path) -> list[Task]:
    """Every task of every ``*.jsonl`` file in ``folder`` (sorted by file name, then line)."""
    files = sorted(Path(folder).glob("*.jsonl"))
    if not files:
        raise TaskFormatError(f"{folder} holds no *.jsonl task files")
    tasks: list[Task] = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskFormatError(f"{where}: not JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise TaskFormatError(f"{where}: a task is a JSON object")
            missing = [k for k in ("prompt", "answer", "check", "topic") if not isinstance(row.get(k), str)]
            if missing:
                raise TaskFormatError(f"{where}: missing or non-string fields {missing}")
            try:
                tasks.append(Task(row["prompt"], row["answer"], row["check"], row["topic"]))
            except ValueError as exc:
                raise TaskFormatError(f"{where}: {exc}") from exc
    return tasks


def topics(tasks: Iterable[Task]) -> list[str]:
    return sorted(Counter(t.topic for t in tasks))


def normalise(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    plain = re.sub(r"[\"'`“”‘’]", " ", plain)
    return " ".join(plain.split()).strip(" .,;:!?()[]{}*")


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def check(kind: str, answer: str, response: str, prompt: str = "") -> bool:
    """Whether ``response`` answers correctly (see the module docstring for each ``kind``)."""
    if kind == "number":
        found = _NUMBER.findall(response)
        if not found:
            return False
        got, want = parse_number(found[-1].rstrip(".")), parse_number(answer)
        return got is not None and want is not None and abs(got - want) < 1e-6
    if kind == "exact":
        lines = [line for line in response.splitlines() if line.strip()]
        return bool(lines) and normalise(lines[0]) == normalise(answer)
    if kind == "contains":
        return _contains(normalise(response), normalise(answer))
    if kind == "choice":
        return _choice(answer.strip().upper(), response, prompt)
    raise ValueError(f"unknown check {kind!r}; known: {CHECKS}")


def _contains(haystack: str, needle: str) -> bool:
    if not needle:
        return False
    return re.search(rf"(?<![a-z0-9]){re.escape(needle)}(?![a-z0-9])", haystack) is not None


def _choice(letter: str, response: str, prompt: str) -> bool:
    options = {m.group(1).upper(): normalise(m.group(2)) for m in _OPTION_LINE.finditer(prompt)}
    letters = "".join(sorted(options)) or "ABCD"
    # Most explicit first: "answer is B", "B)" / "(B)", a response that starts with "B" or "B.".
    # A bare capital inside a sentence is not a pick: "A" is also an English article.
    for pattern in (rf"answer(?:\s+is)?\s*[:\-]?\s*\(?([{letters}])(?![A-Za-z])",
                    rf"(?<![A-Za-z])\(?([{letters}])\)",
                    rf"^\s*([{letters}])(?:[.:,]|\s*$)"):
        picked = re.search(pattern, response, flags=re.IGNORECASE if pattern.startswith("answer") else 0)
        if picked is not None:
            return picked.group(1).upper() == letter
    named = [k for k, text in options.items() if text and _contains(normalise(response), text)]
    return named == [letter]
