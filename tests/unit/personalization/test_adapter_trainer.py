"""The per-user LoRA trainer on a tiny random Llama (real torch and peft)."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.artifacts import hash_directory
from core.personalization import PreferencePair, SftTarget
from models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig, AdapterTrainer
from models.adapters.pin import PIN_FILE, read_pin
from tests.unit.personalization.tiny import ByteTokenizer, tiny_llama

CFG = AdapterConfig(rank=4, alpha=8, last_layers=2, pairs_per_step=2, sft_per_step=1, beta=1.0,
                    base_model_name="tiny-llama")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def trainer(tmp_path: Path, clock: object = None) -> AdapterTrainer:
    kwargs = {"clock": clock} if clock is not None else {}
    return AdapterTrainer(tiny_llama(), ByteTokenizer(), CFG, tmp_path / "adapters", **kwargs)  # type: ignore[arg-type]


def pair(prompt: str, chosen: str, rejected: str, seq: int = 0) -> PreferencePair:
    return PreferencePair(prompt, chosen, rejected, 1.0, "pairwise", f"e{seq}", 0.0, seq)


PAIRS = [pair("Say hi", "hey there!", "Good day to you, sir.", 0),
         pair("Greet me", "yo, hi!", "Greetings and salutations.", 1)]


class TickClock:
    """Each read advances one second: the time budget becomes a count of clock reads."""

    def __init__(self) -> None:
        self.t = itertools.count()

    def __call__(self) -> float:
        return float(next(self.t))


def test_fast_path_matches_a_full_forward_of_the_peft_model(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    update = t.update("u1", PAIRS, [], None, lr=5e-2, steps=3, time_budget_s=60)
    prompt, response = "Say hi", "hey there!"
    fast = t.score(prompt, [response], update.path)[0]
    seq = t.encoder.encode(prompt, response)
    ids = torch.tensor([seq.ids])
    with torch.no_grad():
        logits = t.peft(input_ids=ids).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    targets = ids[0, seq.n_prompt:]
    slow = lp[seq.n_prompt - 1:-1].gather(1, targets[:, None]).mean().item()
    assert fast == pytest.approx(slow, abs=1e-5)
    base = t.score(prompt, [response], None)[0]
    with torch.no_grad(), t.peft.disable_adapter():
        base_lp = torch.log_softmax(t.peft(input_ids=ids).logits[0].float(), -1)
    expected_base = base_lp[seq.n_prompt - 1:-1].gather(1, targets[:, None]).mean().item()
    assert base == pytest.approx(expected_base, abs=1e-5)
    assert fast != pytest.approx(base, abs=1e-6)  # the update changed the model


@pytest.mark.parametrize("bf16", [False, True])
def test_preference_loss_goes_down_and_the_preference_is_learned(tmp_path: Path, bf16: bool) -> None:
    t = AdapterTrainer(tiny_llama(), ByteTokenizer(), replace(CFG, train_bf16=bf16), tmp_path / "adapters")
    before = t.margins(PAIRS, None)
    update = t.update("u1", PAIRS, [], None, lr=3e-2, steps=25, time_budget_s=600)
    after = t.margins(PAIRS, update.path)
    assert update.metrics["steps"] == 25
    assert update.metrics["loss_last"] < 0.8 * update.metrics["loss_first"]
    assert all(a > b for a, b in zip(after, before, strict=True))
    assert all(a > 0 for a in after)


def test_sft_raises_the_target_likelihood(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    target = SftTarget("Say hi", "hello friend", 1.0, "edit", "e", 0.0, 0)
    before = t.score("Say hi", ["hello friend"], None)[0]
    update = t.update("u1", [], [target], None, lr=3e-2, steps=10, time_budget_s=600)
    assert t.score("Say hi", ["hello friend"], update.path)[0] > before + 0.1


def test_adapter_directory_is_peft_format_and_hash_names_the_weights(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    first = t.update("u1", PAIRS, [], None, lr=1e-2, steps=2, time_budget_s=60)
    assert sorted(p.name for p in first.path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, PIN_FILE]
    assert read_pin(first.path) == ("tiny-llama", "base")  # the base version it was trained on
    assert first.hash == hash_directory(first.path) == first.path.name
    config = json.loads((first.path / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == "tiny-llama" and config["r"] == 4
    assert config["layers_to_transform"] == [1, 2]
    # same start, same data, same seed: same weights, same name (from a second trainer too)
    again = trainer(tmp_path).update("u1", PAIRS, [], None, lr=1e-2, steps=2, time_budget_s=60)
    assert again.hash == first.hash
    # no step taken: the previous adapter is returned under its own name
    idle = t.update("u1", PAIRS, [], first.path, lr=1e-2, steps=0, time_budget_s=60)
    assert idle.hash == first.hash and idle.parent_hash == first.hash
    # one more step: different weights, different name
    more = t.update("u1", PAIRS, [], first.path, lr=1e-2, steps=1, time_budget_s=60)
    assert more.hash != first.hash and more.parent_hash == first.hash


def test_stored_adapter_loads_in_plain_peft_with_the_same_scores(tmp_path: Path) -> None:
    from peft import PeftModel

    t = trainer(tmp_path)
    update = t.update("u1", PAIRS, [], None, lr=5e-2, steps=3, time_budget_s=60)
    engine_side = PeftModel.from_pretrained(tiny_llama(), str(update.path), adapter_name=update.hash).eval()
    seq = t.encoder.encode("Greet me", "yo, hi!")
    ids = torch.tensor([seq.ids])
    with torch.no_grad():
        lp = torch.log_softmax(engine_side(input_ids=ids).logits[0].float(), -1)
    expected = lp[seq.n_prompt - 1:-1].gather(1, ids[0, seq.n_prompt:, None]).mean().item()
    assert t.score("Greet me", ["yo, hi!"], update.path)[0] == pytest.approx(expected, abs=1e-5)


def test_warm_start_continues_from_the_previous_adapter_and_fresh_users_start_clean(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    first = t.update("u1", PAIRS, [], None, lr=3e-2, steps=8, time_budget_s=600)
    warm = t.update("u1", PAIRS, [], first.path, lr=3e-2, steps=1, time_budget_s=600)
    fresh = t.update("u2", PAIRS, [], None, lr=3e-2, steps=1, time_budget_s=600)
    assert warm.metrics["warm_start"] == 1.0 and fresh.metrics["warm_start"] == 0.0
    assert warm.metrics["loss_first"] < 0.9 * first.metrics["loss_first"]
    # user 2 starts from the init, not from user 1's weights
    assert fresh.metrics["loss_first"] == pytest.approx(first.metrics["loss_first"], rel=1e-5)


def test_time_budget_is_respected_by_step_count(tmp_path: Path) -> None:
    # Reads: t0=0, prep=1; then one read before each step. Steps start at 2, 3, ...; the n-th
    # check happens at 1 + n with mean step 1, so a step runs while (1 + n) + 1 <= budget.
    t = trainer(tmp_path, TickClock())
    update = t.update("u1", PAIRS, [], None, lr=1e-2, steps=50, time_budget_s=6.5)
    assert update.metrics["steps"] == 4
    assert update.metrics["stopped_by_time"] == 1.0
    exhausted = trainer(tmp_path, TickClock()).update("u1", PAIRS, [], None, lr=1e-2, steps=50,
                                                      time_budget_s=1)
    assert exhausted.metrics["steps"] == 0
    enough = trainer(tmp_path, TickClock()).update("u1", PAIRS, [], None, lr=1e-2, steps=5,
                                                   time_budget_s=1000)
    assert (enough.metrics["steps"], enough.metrics["stopped_by_time"]) == (5, 0.0)


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    with pytest.raises(ValueError, match="lr"):
        t.update("u1", PAIRS, [], None, lr=0.0, steps=1, time_budget_s=1)
    with pytest.raises(ValueError, match="last_layers"):
        AdapterConfig(last_layers=0)
    with pytest.raises(ValueError, match="last_layers"):
        AdapterTrainer(tiny_llama(layers=1), ByteTokenizer(), CFG, tmp_path)
