"""Per-user CoMiGS mixtures trained online (tiny random Llama): bi-level updates learn the
user's preference, users get different numbers of specialists, rounds average the generalists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.personalization import PreferencePair, SftTarget
from models.adapters.mixture import read_mixture
from models.adapters.mixture_trainer import (
    GENERALIST_FILE,
    MixtureConfig,
    MixtureTrainer,
    aggregate_generalists,
    is_validation,
)
from models.adapters.pin import read_pin
from models.adapters.trainer import AdapterConfig
from tests.unit.personalization.tiny import ByteTokenizer, tiny_llama

CFG = MixtureConfig(loss=AdapterConfig(pairs_per_step=2, sft_per_step=1, beta=1.0, base_model_name="tiny-llama"),
                    rank=4, last_layers=2, val_share=0.34, router_every=1, router_steps=1,
                    signals_per_specialist=4, max_specialists=3)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def pair(prompt: str, chosen: str, rejected: str, seq: int) -> PreferencePair:
    return PreferencePair(prompt, chosen, rejected, 1.0, "pairwise", f"e{seq}", 0.0, seq)


PAIRS = [pair("Say hi", "hey there!", "Good day to you, sir.", 0),
         pair("Greet me", "yo, hi!", "Greetings and salutations.", 1),
         pair("Hello?", "hi hi!", "Good evening to you.", 2)]


def test_a_bilevel_update_learns_the_preference_and_trains_the_router_on_held_out_signals(tmp_path: Path) -> None:
    trainer = MixtureTrainer(tiny_llama(), ByteTokenizer(), CFG, tmp_path / "mixtures")
    validation = [p for p in PAIRS if is_validation(p.signal_id, CFG.val_share)]
    assert validation and len(validation) < len(PAIRS)  # both sides of the split are used
    before = trainer.margins(PAIRS, None)
    update = trainer.update("u1", PAIRS, [], None, lr=3e-2, steps=20, time_budget_s=600)
    assert update.metrics["steps"] == 20 and update.metrics["router_steps"] == 20
    assert update.metrics["n_validation"] == len(validation)
    after = trainer.margins(PAIRS, update.path)
    train_pairs = [i for i, p in enumerate(PAIRS) if p not in validation]
    assert all(after[i] > before[i] for i in train_pairs)
    spec, state = read_mixture(update.path)
    assert spec.n_specialists == 1 and spec.layers == (1, 2)
    assert read_pin(update.path) == ("tiny-llama", "base")
    # The router moved (trained on validation batches), the reference (base) scores did not.
    fresh = MixtureTrainer(tiny_llama(), ByteTokenizer(), CFG, tmp_path / "other")
    fresh.load(None)
    initial_router = fresh._layers[0].state_dict()["router.weight"]
    assert not torch.equal(state["layer0.router.weight"], initial_router)
    assert trainer.score("Say hi", ["hey there!"], None) == pytest.approx(fresh.score("Say hi", ["hey there!"], None))


def test_users_with_more_data_hold_more_specialists_and_rounds_average_generalists(tmp_path: Path) -> None:
    trainer = MixtureTrainer(tiny_llama(), ByteTokenizer(), CFG, tmp_path / "mixtures")
    sft = [SftTarget("Say hi", f"hi number {i}", 1.0, "accept", f"s{i}", 0.0, 10 + i) for i in range(6)]
    small = trainer.update("small", PAIRS[:2], [], None, lr=1e-2, steps=3, time_budget_s=600)
    large = trainer.update("large", PAIRS, sft, None, lr=1e-2, steps=3, time_budget_s=600)
    assert read_mixture(small.path)[0].n_specialists == 1
    assert read_mixture(large.path)[0].n_specialists == 3  # 1 + 9 // 4, capped at 3
    _, generalist_dir = aggregate_generalists([small.path, large.path], tmp_path / "generalists")
    averaged = load_file(str(generalist_dir / GENERALIST_FILE))
    s_state, l_state = read_mixture(small.path)[1], read_mixture(large.path)[1]
    key = "layer0.experts.0.down.B"
    assert torch.allclose(averaged[key], (s_state[key] + l_state[key]) / 2)
    assert not any(".experts.1." in k for k in averaged)  # specialists never leave the user
    # The next update of the small user starts from the round's generalists; it grows a specialist.
    grown = trainer.update("small", PAIRS, sft[:2], small.path, lr=1e-2, steps=0, time_budget_s=600,
                           generalist_dir=generalist_dir)
    g_spec, g_state = read_mixture(grown.path)
    assert g_spec.n_specialists == 2 and grown.metrics["generalist_copied"] == 1.0
    assert torch.equal(g_state[key], averaged[key])
    assert torch.equal(g_state["layer0.experts.2.down.B"], g_state["layer0.experts.1.down.B"])  # a copy
