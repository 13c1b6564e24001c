"""Every catalogued model answers a handful of fixed questions it is known to answer.

A model that loads is not a model that works: under transformers 5.17, Gemma-3-270M converted from
its GGUF answered "<sT>aT>r>e" to "What is the capital city of France?". Each question below was
answered correctly by its model, greedily, through the serving path (its catalogued prompt format,
the torch engine), with the pinned versions (``flywheel bench tasks`` measured them; docs/MODELS.md).
A model that answers garbage fails here. One miss is tolerated per model (float round-off on
another CPU can flip a borderline greedy choice); garbage gets none right.
"""

from __future__ import annotations

import pytest

from bench.task_accuracy import answer_all
from bench.tasks import Task
from core.catalog import CATALOG

pytestmark = pytest.mark.model

KNOWN: dict[str, list[Task]] = {
    "smollm2-135m": [
        Task("What is the capital of Hungary?", "Budapest", "contains", "capitals"),
        Task("What is the chemical symbol for copper?", "Cu", "contains", "chemistry"),
        Task('What is the past tense of the verb "see"?', "saw", "contains", "past_tense"),
        Task('What is the opposite of the word "up"?', "down", "contains", "antonyms"),
    ],
    "gemma3-270m": [
        Task("What is the capital of France?", "Paris", "contains", "capitals"),
        Task("What is the capital of Argentina?", "Buenos Aires", "contains", "capitals"),
        Task("What is the capital of Hungary?", "Budapest", "contains", "capitals"),
        Task("What is the chemical symbol for copper?", "Cu", "contains", "chemistry"),
    ],
}


def test_every_catalogued_model_has_sense_questions() -> None:
    assert set(KNOWN) == set(CATALOG)


@pytest.mark.parametrize("model", sorted(KNOWN))
def test_model_answers_known_questions(model: str) -> None:
    answers = answer_all(model, CATALOG[model].prompt_format, KNOWN[model], max_tokens=24)
    right = [task.is_correct(text) for task, (text, _, _) in zip(KNOWN[model], answers, strict=True)]
    shown = [(task.prompt, text) for task, (text, _, _) in zip(KNOWN[model], answers, strict=True)]
    assert sum(right) >= len(right) - 1, f"{model} answers nonsense: {shown}"
