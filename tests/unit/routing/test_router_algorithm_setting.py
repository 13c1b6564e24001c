"""FLYWHEEL_ROUTER_ALGORITHM picks the live ranking rule; an unknown name is a clear error."""

from __future__ import annotations

import pytest

from agents.router import ROUTER_CONFIG, router_config
from core.routing.eagle import EagleConfig
from core.routing.local_quality import LocalQualityConfig
from core.routing.state import algorithm_of
from infra.settings import Settings


def test_the_setting_selects_the_ranking_rule():
    assert router_config(Settings().router_algorithm) == ROUTER_CONFIG
    assert isinstance(router_config("local_quality"), LocalQualityConfig)
    eagle = router_config("eagle")
    assert isinstance(eagle, EagleConfig) and algorithm_of(eagle) == "eagle"


def test_an_unknown_algorithm_names_the_known_ones():
    with pytest.raises(ValueError, match="local_quality, eagle"):
        router_config("knn")
    with pytest.raises(ValueError):
        Settings(router_algorithm="knn")  # type: ignore[arg-type]
