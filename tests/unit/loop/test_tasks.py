"""Task sets: the layout, its errors, and each check against hand-written cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.task_accuracy import DEFAULT_TASKS
from bench.tasks import TaskFormatError, check, load_tasks, topics

MC = "Which planet is red?\nA) Venus\nB) Mars\nC) Jupiter\nD) Saturn"


@pytest.mark.parametrize(("kind", "answer", "response", "right"), [
    ("number", "59", "To subtract 4 from 63: 63 - 4 = 59.", True),
    ("number", "59", "63 - 4 = 59, or 60 if you round up", False),  # the LAST number counts
    ("number", "1200", "That makes 1,200 apples.", True),
    ("number", "7", "seven", False),
    ("contains", "Buenos Aires", "The capital is buenos  aires!", True),
    ("contains", "école", "L'Ecole est grande", True),  # accents and apostrophes normalised
    ("contains", "C", "The symbol is Ca.", False),  # whole words only
    ("contains", "Au", "It is Au.", True),
    ("exact", "Paris", "paris.\nIt is in France.", True),
    ("exact", "Paris", "The capital is Paris.", False),
    ("choice", "B", "B", True),
    ("choice", "B", "B) Mars", True),
    ("choice", "B", "The answer is (B).", True),
    ("choice", "B", "A) Venus", False),
    ("choice", "B", "A red planet is Mars", True),  # "A" inside a sentence is an article, not a pick
    ("choice", "B", "Mars", True),  # no letter: the option's text decides
    ("choice", "B", "Mars or Venus", False),  # two options named: no pick
])
def test_checks(kind: str, answer: str, response: str, right: bool) -> None:
    assert check(kind, answer, response, MC) is right


def test_load_tasks_reads_every_file_and_topic(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "2+2?", "answer": "4", "check": "number",
                                                  "topic": "maths"}) + "\n\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "Capital of Peru?", "answer": "Lima",
                                                  "check": "contains", "topic": "capitals"}) + "\n")
    tasks = load_tasks(tmp_path)
    assert [t.topic for t in tasks] == ["capitals", "maths"]
    assert topics(tasks) == ["capitals", "maths"]


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "b.jsonl:1: not JSON"),
    (json.dumps({"prompt": "x", "answer": "y", "check": "number", "topic": "t"}), "numeric answer"),
    (json.dumps({"prompt": "x", "answer": "y", "check": "fuzzy", "topic": "t"}), "check must be one of"),
    (json.dumps({"prompt": "x", "answer": "y", "check": "exact"}), "missing or non-string fields \\['topic'\\]"),
])
def test_bad_lines_are_refused_with_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "b.jsonl").write_text(line + "\n")
    with pytest.raises(TaskFormatError, match=message):
        load_tasks(tmp_path)


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TaskFormatError, match=r"no \*\.jsonl"):
        load_tasks(tmp_path)


def test_default_set_is_valid_and_its_answers_pass_their_own_checks() -> None:
    tasks = load_tasks(DEFAULT_TASKS)
    assert len(topics(tasks)) >= 5
    for task in tasks:
        assert task.is_correct(task.answer), task
        assert not task.is_correct(task.prompt), task  # echoing the question is never right
