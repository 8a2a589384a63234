"""``examples/custom_loop_guarded.py``: a plain PyTorch loop on the testbed, guarded by ``Guard``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_loop_guarded.py"


def test_a_plain_loop_on_harmful_data_is_halted_early(small_landscape, tmp_path, capsys):
    _land, landscape, _restored = small_landscape
    spec = importlib.util.spec_from_file_location("custom_loop_guarded", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "run"
    code = example.main(["--landscape", str(landscape), "--steps", "40", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    summary = json.loads((out / "safety-guard" / "summary.json").read_text())
    assert code == 0
    # harmful-compliance data breaks the testbed within a few steps (the callback on the same
    # data and learning rate halts at step 8 of the README's demo); the guard stops it first
    assert summary["halt_step"] is not None and summary["halt_step"] <= 20, printed
    assert f"halted at step {summary['halt_step']}" in printed
    assert summary["horizon_counts"] == "learning rate"
    assert summary["last_safe_step"] is None or summary["last_safe_step"] < summary["halt_step"]
