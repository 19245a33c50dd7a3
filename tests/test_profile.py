"""Device profiles: every bundled profile loads; typos and bad values are clear errors; missing providers fall back."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from nomoat.edge.model import choose_providers
from nomoat.edge.profile import ProfileError, load_profile

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "firmware-configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_bundled_profiles_load(path):
    p = load_profile(path)
    assert p.name == path.stem and p.providers and p.threads >= 0
    assert load_profile(path.stem).name == path.stem  # by name too


def test_expected_profiles_exist():
    assert {p.stem for p in CONFIGS} >= {"raspberry-pi-4", "raspberry-pi-5", "raspberry-pi-zero-2w",
                                         "android-termux", "x86-64-dev"}
    assert load_profile("raspberry-pi-4").accuracy_level in (0, 1)  # no dot-product on Cortex-A72
    assert load_profile("raspberry-pi-5").accuracy_level == 4


@pytest.mark.parametrize("text,message", [
    ("threads = 2\nthraeds = 4\n", "unknown key 'thraeds'"),
    ("threads = 'four'\n", "threads must be int"),
    ("accuracy_level = 3.5\n", "accuracy_level must be"),
    ("prefill_accuracy_level = 5\n", "prefill_accuracy_level must be"),
    ("[mqtt]\nbrokr = 'x'\n", "unknown key 'brokr'"),
    ("graph_optimization = 'max'\n", "graph_optimization must be one of"),
    ("threads = [\n", "unreadable profile"),
])
def test_bad_profiles(tmp_path, text, message):
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(ProfileError, match=message):
        load_profile(f)


def test_missing_provider_falls_back_to_cpu_with_a_log_line(caplog):
    p = load_profile("android-termux")
    with caplog.at_level(logging.WARNING):
        chosen = choose_providers(p)
    assert chosen[-1][0] == "CPUExecutionProvider"
    assert "XnnpackExecutionProvider is not in this onnxruntime build" in caplog.text
