"""How the client completes feedback before publishing it (no broker needed): OpenAI ids are
accepted, the model and versions come from what was delivered or the workers' ledger, served
facts win over claims, and a ledger outage never loses the feedback."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import pytest

from flywheel.client import FlywheelClient, Served, bare_request_id


class Ledger:
    """A stand-in for the pool over ``final_responses``."""

    def __init__(self, rows: list[dict[str, Any]] | None = None, error: Exception | None = None) -> None:
        self.rows, self.error = rows or [], error
        self.asked: list[list[str]] = []

    async def fetch(self, query: str, ids: list[str]) -> list[dict[str, Any]]:
        self.asked.append(list(ids))
        if self.error is not None:
            raise self.error
        return [r for r in self.rows if r["request_id"] in ids]


def client(ledger: Ledger, memory: int = 100) -> FlywheelClient:
    c = FlywheelClient.__new__(FlywheelClient)  # the Kafka side is not needed to complete feedback
    c.services = SimpleNamespace(pool=ledger)  # type: ignore[assignment]
    c._served, c._served_memory = OrderedDict(), memory
    return c


def response(rid: str, model: str = "smollm2-135m", **extra: Any) -> dict[str, Any]:
    return {"request_id": rid, "user_id": "u", "model": model, "model_version": "v2", "adapter_version": "1:ab",
            "error": None} | extra


def test_bare_request_id():
    assert bare_request_id("chatcmpl-abc") == "abc"
    assert bare_request_id("abc") == "abc"
    assert bare_request_id("chatcmpl-chatcmpl-x") == "chatcmpl-x"  # only the one prefix the gateway adds


async def test_delivered_answers_fill_in_the_model_and_versions():
    c = client(Ledger())
    c.remember_served(response("r1"))
    out = await c.complete_feedback({"user_id": "u", "request_id": "chatcmpl-r1", "kind": "thumbs",
                                     "thumbs_up": True, "model": "claimed"})
    assert out["request_id"] == "r1"
    assert (out["model"], out["model_version"], out["adapter_version"]) == ("smollm2-135m", "v2", "1:ab")


async def test_pairwise_sides_are_filled_and_stripped():
    c = client(Ledger(rows=[{"request_id": "b", "user_id": "u", "model": "gemma3-270m", "model_version": "base",
                             "adapter_version": None}]))
    c.remember_served(response("a"))
    out = await c.complete_feedback({"user_id": "u", "request_id": "chatcmpl-a", "kind": "pairwise", "pairwise": {
        "request_id_a": "chatcmpl-a", "request_id_b": "chatcmpl-b", "winner": "b"}})
    assert out["pairwise"] == {"request_id_a": "a", "model_a": "smollm2-135m", "request_id_b": "b",
                               "model_b": "gemma3-270m", "winner": "b"}


async def test_the_ledger_answers_for_older_responses_and_unknown_ones_stay_as_given():
    ledger = Ledger(rows=[{"request_id": "old", "user_id": "u", "model": "gemma3-270m", "model_version": "v9",
                           "adapter_version": None}])
    c = client(ledger)
    old = await c.complete_feedback({"user_id": "u", "request_id": "old", "kind": "rating", "rating": 0.5})
    assert (old["model"], old["model_version"]) == ("gemma3-270m", "v9")
    unknown = await c.complete_feedback({"user_id": "u", "request_id": "nope", "kind": "thumbs", "thumbs_up": True})
    assert unknown.get("model") is None and ledger.asked == [["old"], ["nope"]]


@pytest.mark.parametrize("error", [OSError("connection refused"), TimeoutError()])
async def test_a_ledger_outage_does_not_lose_the_feedback(error):
    c = client(Ledger(error=error))
    out = await c.complete_feedback({"user_id": "u", "request_id": "x", "kind": "thumbs", "thumbs_up": False})
    assert out["request_id"] == "x" and out.get("model") is None


def test_memory_is_bounded_and_error_answers_are_not_remembered():
    c = client(Ledger(), memory=2)
    for rid in ("a", "b", "c"):
        c.remember_served(response(rid))
    c.remember_served(response("e", model="none", error="budget too small"))
    assert list(c._served) == ["b", "c"]
    assert c._served["c"] == Served("u", "smollm2-135m", "v2", "1:ab")


async def test_a_pairwise_preference_between_unknown_answers_is_refused_before_publishing():
    c = client(Ledger())
    with pytest.raises(ValueError, match="models to compare are unknown"):
        await c.feedback(user_id="u", request_id="a", kind="pairwise",
                         pairwise={"request_id_a": "a", "request_id_b": "b", "winner": "a"})
