"""The loader: entry points and dotted paths, and a name two packages claim."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.loader import STRATEGY_GROUP, load


def fake_distribution(root: Path, name: str, target: str) -> None:
    """An installed distribution (a .dist-info on sys.path) registering `target`
    as the strategy "fancy"."""
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[bascule.strategies]\nfancy = {target}\n")


def test_a_name_two_packages_register_is_an_error_naming_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(tmp_path, "fancy_one", "strategies.round_robin:RoundRobin")
    fake_distribution(tmp_path, "fancy_two", "strategies.weighted_random:WeightedRandom")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as err:
        load(STRATEGY_GROUP, "fancy")
    message = str(err.value)
    assert message.startswith("strategy 'fancy' is registered by more than one package: ")
    assert "fancy_one (strategies.round_robin:RoundRobin)" in message
    assert "fancy_two (strategies.weighted_random:WeightedRandom)" in message


def test_one_registration_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(tmp_path, "fancy_one", "strategies.round_robin:RoundRobin")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load(STRATEGY_GROUP, "fancy").__name__ == "RoundRobin"
