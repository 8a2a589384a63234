"""Landscapes end to end on tiny models: grid vs adaptive, resume after a crash, file checks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model

from safety_guard.landscape import (
    FORMAT_VERSION,
    Landscape,
    LandscapeConfig,
    LandscapeFileError,
    LandscapeMismatchError,
    compute_landscape,
    parse_grid,
)
from safety_guard.measure.probe import PointResult, ProbeConfig, SafetyProbe

GRID = parse_grid("-0.5:0.5:21")


class StepProbe(SafetyProbe):
    """A synthetic 'model': ASR is a step function of how far the weights moved along one tensor.

    α is recovered from the weights themselves (layer-normalized: ‖Δw‖/‖w₀‖ = |α|, sign from a
    fixed reference direction), so the probe sees exactly what the landscape did to the model.
    """

    def __init__(self, model, lower=-0.17, upper=0.23, fail_after=None):
        super().__init__(model, None, ProbeConfig(num_harmful=4, num_benign=0), harmful=None)
        self.param = model.model.layers[0].mlp.up_proj.weight
        self.origin = self.param.detach().clone()
        self.lower, self.upper = lower, upper
        self.calls = 0
        self.fail_after = fail_after
        self.seen: list[float] = []

    def prepare(self, **kwargs):
        pass

    def settings(self):
        return {"synthetic": [self.lower, self.upper]}

    def evaluate(self, prompts=None, progress=None, capability=True, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        delta = (self.param.detach() - self.origin).float()
        alpha = float(delta.norm() / self.origin.norm())
        sign = 1.0 if float((delta * self._ref()).sum()) >= 0 else -1.0
        alpha = round(sign * alpha, 6)
        self.seen.append(alpha)
        if alpha >= self.upper + 0.05 or alpha <= self.lower - 0.05:
            asr = 100.0
        elif alpha >= self.upper or alpha <= self.lower:
            asr = 75.0
        else:
            asr = 0.0
        return PointResult(asr, int(asr), 100, 1.0 + abs(alpha), 10, 0.0)

    def _ref(self):
        return self._sign_ref  # the direction's slice for this tensor, set by _probe_for

    _sign_ref = None


def _probe_for(model, seed, **kw):
    from safety_guard.landscape.directions import RandomDirection

    probe = StepProbe(model, **kw)
    name = "model.layers.0.mlp.up_proj.weight"
    probe._sign_ref = RandomDirection(seed).tensor(name, probe.origin)
    return probe


def test_adaptive_and_uniform_find_the_same_edge_on_a_step_model(tmp_path):
    model = make_model()
    grid_probe = _probe_for(model, seed=0)
    grid = compute_landscape(
        model,
        None,
        LandscapeConfig(num_directions=1, alphas=GRID, search="grid"),
        grid_probe,
        progress=False,
    )
    adaptive_probe = _probe_for(model, seed=0)
    adaptive = compute_landscape(
        model,
        None,
        LandscapeConfig(num_directions=1, alphas=GRID, search="adaptive"),
        adaptive_probe,
        progress=False,
    )
    eg, ea = grid.edges()[0], adaptive.edges()[0]
    assert (eg.lower_outside, eg.upper_outside) == (ea.lower_outside, ea.upper_outside)
    assert (eg.lower_outside, eg.upper_outside) == (pytest.approx(-0.25), pytest.approx(0.3))
    assert grid.visage()["mean"] == pytest.approx(adaptive.visage()["mean"])
    assert grid_probe.calls == 21 and adaptive_probe.calls <= 14  # two steps on each side
    assert adaptive.data["summary"]["decoded_tokens"] < grid.data["summary"]["decoded_tokens"]


def test_crash_mid_landscape_resumes_from_saved_points(tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "land.json"
    cfg = LandscapeConfig(num_directions=2, alphas=GRID, search="grid")
    crashing = _probe_for(model, seed=0, fail_after=15)
    with pytest.raises(KeyboardInterrupt):
        compute_landscape(model, None, cfg, crashing, output=out, progress=False)
    for k, v in model.state_dict().items():  # weights restored despite the crash
        assert torch.equal(v, before[k]), k
    saved = Landscape.load(out)
    assert not saved.complete
    assert sum(len(d["points"]) for d in saved.data["directions"]) == 15  # origin + 14 moves
    resumed = _probe_for(model, seed=0)
    land = compute_landscape(model, None, cfg, resumed, output=out, progress=False)
    assert land.complete
    assert resumed.calls == 2 * 20 - 14
    assert all(len(d["points"]) == 21 for d in land.data["directions"])


def test_landscape_file_checks(tmp_path):
    model = make_model()
    out = tmp_path / "land.json"
    cfg = LandscapeConfig(num_directions=1, alphas=(-0.3, 0.0, 0.3), search="grid")
    compute_landscape(model, None, cfg, _probe_for(model, 0), output=out, progress=False)
    land = Landscape.load(out)
    land.check_model(model)
    land.check_model(make_model().to(torch.bfloat16))  # same weights in bf16 still match
    with pytest.raises(LandscapeMismatchError, match="another model"):
        land.check_model(make_model(seed=3))
    with pytest.raises(LandscapeMismatchError, match="settings"):
        compute_landscape(
            model,
            None,
            LandscapeConfig(num_directions=1, alphas=(-0.2, 0.0, 0.2), search="grid"),
            _probe_for(model, 0),
            output=out,
            progress=False,
        )
    with pytest.raises(FileExistsError):
        compute_landscape(
            model, None, cfg, _probe_for(model, 0), output=out, resume=False, progress=False
        )
    data = json.loads(out.read_text())
    data["version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(data))
    with pytest.raises(LandscapeFileError, match="newer"):
        Landscape.load(newer)
    with pytest.raises(LandscapeFileError, match="does not exist"):
        Landscape.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LandscapeFileError, match="bad JSON"):
        Landscape.load(tmp_path / "bad.json")
    # the mismatching model computation above must not have touched the file
    assert Landscape.load(out).data == land.data


def test_config_validation():
    with pytest.raises(ValueError, match="contain 0"):
        LandscapeConfig(alphas=(-0.1, 0.1))
    with pytest.raises(ValueError, match="1D only"):
        LandscapeConfig(dims=2, search="adaptive")
    with pytest.raises(ValueError, match="start:stop:count"):
        parse_grid("a:b")
    with pytest.raises(ValueError, match="interpolation"):
        compute_landscape(
            make_model(), None, LandscapeConfig(kind="interpolation"), _probe_for(make_model(), 0)
        )


def test_real_probe_1d_and_2d_on_tiny_model(tmp_path, tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    probe = ProbeConfig(num_harmful=6, num_benign=3, max_new_tokens=6, capability_tokens=6)
    land = compute_landscape(
        model,
        tokenizer,
        LandscapeConfig(num_directions=2, alphas=(-0.2, 0.0, 0.2), search="grid"),
        probe,
        output=tmp_path / "one.json",
        progress=False,
    )
    curves = land.curves()
    assert len(curves) == 2 and all(c["alphas"] == [-0.2, 0.0, 0.2] for c in curves)
    assert all(isinstance(v, float) for c in curves for v in c["nll"])
    assert land.data["probe"]["harmful"]["count"] == 6
    assert len(land.data["probe"]["harmful"]["sha256"]) == 64
    two = compute_landscape(
        model,
        tokenizer,
        LandscapeConfig(dims=2, alphas=(-0.1, 0.0, 0.1), search="grid"),
        probe,
        output=tmp_path / "two.json",
        progress=False,
    )
    assert len(two.data["surface"]["points"]) == 9
    assert two.complete


def _side_search(curve, tolerance=1.0, threshold=100.0):
    """Run the adaptive search on one side of a known curve; return measured α and VISAGE pair."""
    from safety_guard.landscape.analysis import visage
    from safety_guard.landscape.run import _bisect_side

    side = [round(0.05 * i, 10) for i in range(1, 11)]
    seen: dict[float, float] = {}

    def asr(alpha):
        seen[alpha] = curve(alpha)
        return seen[alpha]

    _bisect_side(side, asr, threshold, tolerance)
    full = {0.0: curve(0.0), **{a: curve(a) for a in side}}
    exact = visage(list(full), list(full.values()), threshold=threshold)
    estimate = visage(list(seen), list(seen.values()), grid=[0.0, *side], threshold=threshold)
    return seen, exact, estimate


def test_adaptive_side_search_on_a_step_measures_few_points():
    seen, exact, estimate = _side_search(lambda a: 0.0 if a < 0.32 else 100.0)
    assert len(seen) <= 5  # origin, far end, ~3 bisection steps
    assert estimate == pytest.approx(exact)


def test_adaptive_side_search_on_a_ramp_keeps_visage_within_tolerance():
    ramp = {0.0: 0, 0.05: 0, 0.1: 2.5, 0.15: 10, 0.2: 40, 0.25: 75, 0.3: 95, 0.35: 100}
    seen, exact, estimate = _side_search(lambda a: ramp.get(round(a, 10), 100.0), tolerance=1.0)
    assert abs(estimate - exact) <= 1.0
    assert max(a for a, v in seen.items() if v < 100) == 0.3  # last point inside is measured
    assert 0.4 not in seen and 0.45 not in seen  # points past the edge are skipped


def test_adaptive_side_search_finds_the_first_outside_point_on_a_non_monotone_curve():
    # outside at 0.15, back inside at 0.2-0.3 (noise), outside for good from 0.35
    def curve(a):
        a = round(a, 10)
        return 100.0 if a == 0.15 or a >= 0.35 else (0.0 if a < 0.15 else 60.0)

    seen, exact, estimate = _side_search(curve, tolerance=0.0)
    first_outside = min(a for a, v in seen.items() if v >= 100)
    assert first_outside == 0.15
    assert estimate == pytest.approx(exact)


def test_landscape_records_the_forward_screen_against_the_judge(tmp_path, text_tokenizer):
    """Generating every prompt, each point records which prompts the judge found unsafe and
    which the guard's screen flagged; the summary says the screen missed none (its exactness on
    this model)."""
    from guard_helpers import echo_judge

    from safety_guard.measure.prompts import load_prompts

    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    prompts = list(load_prompts("builtin:harmful", limit=12))
    probe = SafetyProbe(
        model,
        text_tokenizer,
        ProbeConfig(num_harmful=12, num_benign=0, max_new_tokens=8, signal="generate"),
        judge=echo_judge(model, text_tokenizer, prompts),
    )
    land = compute_landscape(
        model,
        text_tokenizer,
        LandscapeConfig(num_directions=1, alphas=(-0.2, -0.1, 0.0, 0.1, 0.2), search="grid"),
        probe,
        output=tmp_path / "land.json",
        progress=False,
    )
    saved = json.loads((tmp_path / "land.json").read_text())
    assert saved["version"] == FORMAT_VERSION == 4
    points = saved["directions"][0]["points"]
    assert all("flagged_prompts" in p and "unsafe_prompts" in p for p in points)
    screen = land.screen_agreement()
    assert screen == saved["summary"]["screen"]
    assert screen["points"] == 5 and screen["unsafe"] > 0  # the far points left the basin
    assert screen["missed"] == 0 and screen["recall"] == 1.0
    for p in points:  # every unsafe answer was flagged
        assert set(p["unsafe_prompts"]) <= set(p["flagged_prompts"])
