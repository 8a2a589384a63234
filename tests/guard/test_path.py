"""A guarded run's path over a 2D landscape spanned by its finetune direction."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model
from guard_helpers import TINY_GUARD, make_landscape, train_loop

from safety_guard import Guard
from safety_guard.cli.main import main as cli
from safety_guard.guard.displacement import decode_sketch, encode_sketch
from safety_guard.guard.path import landscape_target_step, run_path
from safety_guard.landscape import Landscape, LandscapeConfig


def _probe(step: int, displacement: float, sketch: list[float], status: str = "ok") -> dict:
    return {
        "event": "probe",
        "step": step,
        "displacement": displacement,
        "status": status,
        "points": {"1": {}, "2": {}},
        "sketch": encode_sketch(torch.tensor(sketch, dtype=torch.float64)),
    }


def test_probes_lie_along_the_target_direction_at_their_projected_displacement():
    records = [
        {"event": "check", "step": 1, "displacement": 1e-5},
        _probe(2, 1e-4, [1.0, 0.0, 0.0]),
        _probe(4, 2e-4, [1.0, 1.0, 0.0]),  # turned 45° from step 2
        _probe(8, 4e-4, [1.0, 1.0, 0.0], "halt"),
    ]
    path = run_path(records, target_step=4)
    assert [p["step"] for p in path] == [2, 4, 8]
    assert path[0]["alpha"] == pytest.approx(1e-4 * math.sqrt(0.5) / 2e-4)
    assert path[1]["alpha"] == pytest.approx(1.0)  # the target itself
    assert path[2]["alpha"] == pytest.approx(2.0) and path[2]["status"] == "halt"
    assert path[2]["ahead"] == {2.0: pytest.approx(4.0)}  # θ₀ + 2·δ₈
    # float32 text round trip
    assert decode_sketch(encode_sketch(torch.tensor([1e-7, -3.5]))).tolist() == [
        pytest.approx(1e-7),
        -3.5,
    ]


def test_a_path_needs_the_target_probe_and_the_sketches():
    records = [_probe(2, 1e-4, [1.0, 0.0])]
    with pytest.raises(ValueError, match=r"no probe at step 5 \(its probes: 2\)"):
        run_path(records, target_step=5)
    old = [{**records[0], "sketch": None}]
    with pytest.raises(ValueError, match="recorded no sketch"):
        run_path(old, target_step=2)
    with pytest.raises(ValueError, match="base64 text of float32"):
        decode_sketch("not base64!")


def _path_landscape(target: str) -> Landscape:
    alphas = [-0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    betas = [-0.1, 0.0, 0.1]
    config = LandscapeConfig(
        dims=2, kind="interpolation", alphas=alphas, betas=betas, search="grid"
    )
    land = Landscape.new(config, {"judge": "keyword"}, {}, "tiny-model", "float32", [])
    land.data["surface"] = {
        "directions": [
            {"kind": "lora", "adapter": target},
            {"kind": "random", "seed": 0, "normalization": "layer"},
        ],
        "alphas": alphas,
        "betas": betas,
        "points": [
            {"alpha": a, "beta": b, "asr": min(100.0, 5.0 + 30.0 * max(a - 1.0, 0.0)), "nll": 2.0}
            for b in betas
            for a in alphas
        ],
    }
    land.summarize()
    return land


def test_a_guarded_lora_loop_draws_its_path_over_a_landscape_of_its_last_safe_adapter(
    tmp_path, text_tokenizer, capsys
):
    from peft import LoraConfig, get_peft_model

    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    land = make_landscape(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    folder = tmp_path / "guard"
    settings = {**TINY_GUARD, "keep_last_safe": True}
    guard = Guard(model, text_tokenizer, land, output_dir=folder, **settings)
    train_loop(model, text_tokenizer, guard, steps=6)
    guard.end()
    lines = [json.loads(x) for x in (folder / "trajectory.jsonl").read_text().splitlines()]
    probes = [r for r in lines if r["event"] == "probe"]
    assert len(probes) >= 2
    # every probe carries δ's sketch, as the cadence compares it
    sizes = {decode_sketch(r["sketch"]).numel() for r in probes}
    assert sizes == {guard.tracker.sketch(model).numel()}
    safe = folder / "last-safe"
    step = landscape_target_step(_path_landscape(str(safe)))
    assert step == guard.state.last_safe_step == probes[-1]["step"]
    path = run_path(lines, step)
    assert path[-1]["alpha"] == pytest.approx(1.0)
    assert all(0.0 < p["alpha"] <= 1.0 + 1e-6 for p in path)  # on the way out to the target
    file = tmp_path / "path.json"
    _path_landscape(str(safe)).save(file)
    out = tmp_path / "path.png"
    assert cli(["plot", str(folder), "--landscape", str(file), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    # a landscape of random directions has no finetune axis; a target without its step
    # needs --target-step
    random = tmp_path / "random.json"
    make_landscape(make_model(vocab_size=len(text_tokenizer), tie=False)).save(random)

    def error(*argv: str) -> str:
        capsys.readouterr()
        assert cli(["plot", *argv, "-o", str(out)]) == 2
        return capsys.readouterr().err

    assert "first axis is the finetune direction" in error(str(folder), "--landscape", str(random))
    bare = tmp_path / "bare.json"
    _path_landscape(str(tmp_path / "elsewhere")).save(bare)
    assert "pass --target-step" in error(str(folder), "--landscape", str(bare))
    argv = ["plot", str(folder), "--landscape", str(bare), "--target-step", str(step)]
    assert cli([*argv, "-o", str(out)]) == 0
    assert "FILE must be the run's folder" in error(str(file), "--landscape", str(file))
