"""Fixtures of the integration tests: the real testbed model, built once per machine.

The first run builds the aligned SmolLM2-135M-Instruct (≈ 14 minutes on 2 CPU cores) into the
cache (``$SAFETY_GUARD_CACHE`` or ``~/.cache/safety-guard``); later runs reuse it at once.
Run them with ``pytest -m integration``.

Example:
    def test_something(testbed):
        model, tokenizer = testbed
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def testbed_dir() -> Path:
    """The folder of the aligned testbed model (built on first use, then cached)."""
    from safety_guard.testbed import build_testbed

    return build_testbed()


@pytest.fixture(scope="session")
def testbed(testbed_dir: Path) -> tuple[Any, Any]:
    """The aligned testbed ``(model, tokenizer)``, fp32 on CPU, loaded once per session."""
    from safety_guard.testbed import load_testbed

    return load_testbed(device="cpu")


@pytest.fixture(scope="session")
def small_landscape(testbed: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory):
    """A small real landscape of the testbed (one direction, α ∈ {−0.3, 0, 0.3}, 20 prompts,
    every answer recorded), computed once, and whether the model's weights were exactly as
    before afterwards."""
    import torch

    from safety_guard.landscape import LandscapeConfig, compute_landscape
    from safety_guard.measure.probe import ProbeConfig

    model, tokenizer = testbed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("landscape") / "land.json"
    land = compute_landscape(
        model,
        tokenizer,
        LandscapeConfig(num_directions=1, alphas=(-0.3, 0.0, 0.3), search="grid"),
        ProbeConfig(num_harmful=20, num_benign=4, record_answers=True),
        output=path,
        progress=False,
    )
    restored = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return land, path, restored
