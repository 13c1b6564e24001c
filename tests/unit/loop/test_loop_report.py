"""The closed-loop benchmark's numbers against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.loop_report import Interaction, lift, percentile, spread, windows, write_svg


def _ia(i: int, reward: float, correct: bool, model: str = "a", topic: str = "t", cost: float = 1.0,
        latency: float = 100.0) -> Interaction:
    return Interaction(i, "u", topic, model, reward, correct, cost, latency)


def test_windows_are_blocks_in_issue_order() -> None:
    records = [_ia(3, 1.0, True, "b"), _ia(0, 0.0, False), _ia(1, 0.5, True), _ia(2, 0.5, False, "b", "s")]
    out = windows(records, 2)
    assert [w["start"] for w in out] == [0, 2]
    assert out[0]["reward"] == 0.25 and out[0]["accuracy"] == 0.5
    assert out[1]["routing_share"] == {"s": {"b": 1.0}, "t": {"b": 1.0}}
    with pytest.raises(ValueError):
        windows(records, 0)


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0], 0.99) == 5.0


def test_lift_and_spread() -> None:
    final = {"frozen": {"reward": 0.4}, "all": {"reward": 0.5}}
    assert lift(final, "reward") == {"frozen": 1.0, "all": 1.25}
    assert spread([1.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}


def test_svg_has_one_line_per_arm(tmp_path: Path) -> None:
    path = tmp_path / "curves.svg"
    write_svg(path, {"frozen": [0.4, 0.41], "all": [0.4, 0.55]}, "t", "reward", 200,
              {"all": [(0.38, 0.42), (0.5, 0.6)]})
    text = path.read_text()
    assert text.count("<polyline") == 2 and "frozen" in text and "<polygon" in text
