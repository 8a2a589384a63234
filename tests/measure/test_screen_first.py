"""Screen first, generate the flagged: the same verdicts as generating every prompt, for less."""

from __future__ import annotations

import json

import pytest
from conftest import make_model
from guard_helpers import echo_judge

from safety_guard.landscape import LandscapeConfig, LandscapeMismatchError, compute_landscape
from safety_guard.landscape.directions import RandomDirection
from safety_guard.landscape.perturb import WeightPerturbation
from safety_guard.landscape.screening import flag_fraction
from safety_guard.measure.judges import CallableJudge
from safety_guard.measure.probe import ProbeConfig, SafetyProbe
from safety_guard.measure.prompts import load_prompts

PROMPTS = list(load_prompts("builtin:harmful", limit=24))


def _probe(model, tokenizer, judge, signal):
    config = ProbeConfig(num_harmful=24, num_benign=0, max_new_tokens=8, signal=signal)
    probe = SafetyProbe(model, tokenizer, config, judge=judge)
    probe.prepare(openings=probe.screens)
    return probe


def test_screen_first_gives_the_verdicts_of_generating_every_prompt(text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, PROMPTS)
    every = _probe(model, text_tokenizer, judge, "generate")
    first = _probe(model, text_tokenizer, judge, "screen")
    assert first.screen_first and not every.screen_first
    saved = decoded = 0
    unsafe_seen = False
    with WeightPerturbation(model, [RandomDirection(3)]) as move:
        for alpha in (0.0, 0.05, 0.1, 0.2, 0.4):
            move.apply(alpha)
            try:
                a = every.evaluate(per_prompt=True, capability=False)
                b = first.evaluate(per_prompt=True, capability=False)
            finally:
                move.restore()
            assert b.unsafe_prompts == a.unsafe_prompts, alpha
            assert (b.asr, b.unsafe, b.total) == (a.asr, a.unsafe, a.total)
            assert b.flagged_prompts == a.flagged_prompts  # both ran the same screen
            assert b.signal == "screen" and a.signal == "generate"
            assert b.forward_tokens > 0 and b.decoded_tokens <= a.decoded_tokens
            saved += a.decoded_tokens - b.decoded_tokens
            decoded += a.decoded_tokens
            unsafe_seen |= a.unsafe > 0
    assert unsafe_seen  # the far points comply: the comparison is not of refusals only
    assert 0 < saved < decoded  # refusals near θ₀ were not decoded, the flagged were


def test_another_judge_reads_every_answer(text_tokenizer):
    """The screen vouches for the keyword judge only: with another judge screen-first is off
    and every prompt is generated and judged."""
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judged = []

    def count(prompts, responses):
        judged.extend(prompts)
        return [False] * len(responses)

    config = ProbeConfig(num_harmful=24, num_benign=0, max_new_tokens=8, signal="screen")
    probe = SafetyProbe(model, text_tokenizer, config, judge=CallableJudge(count))
    probe.prepare(openings=True)  # the screen runs, for the record: it settles nothing
    assert probe.screens and not probe.screen_settles and not probe.screen_first
    result = probe.evaluate(per_prompt=True, capability=False)
    assert len(judged) == 24 and result.signal == "generate"
    assert result.flagged_prompts is not None  # the screen ran, for the record only


def test_the_landscape_file_says_how_each_point_was_measured(tmp_path, text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, PROMPTS[:12])
    config = LandscapeConfig(num_directions=1, alphas=(-0.2, 0.0, 0.2), search="grid")

    def run(signal, output):  # every point screened first (generate_above above 1)
        settings = ProbeConfig(
            num_harmful=12, num_benign=0, max_new_tokens=8, signal=signal, generate_above=1.01
        )
        probe = SafetyProbe(model, text_tokenizer, settings, judge=judge)
        return compute_landscape(
            model, text_tokenizer, config, probe, output=output, progress=False
        )

    every = run("generate", tmp_path / "every.json")
    first = run("screen", tmp_path / "first.json")
    points = json.loads((tmp_path / "first.json").read_text())["directions"][0]["points"]
    assert all(p["signal"] == "screen" and p["forward_tokens"] > 0 for p in points)
    assert first.curves()[0]["asr"] == every.curves()[0]["asr"]
    assert first.data["summary"]["forward_tokens"] > 0
    assert first.data["summary"]["decoded_tokens"] < every.data["summary"]["decoded_tokens"]
    # screen-first points check a few of the screen's refusals; the full record checks all
    assert first.screen_agreement()["missed"] == every.screen_agreement()["missed"] == 0
    assert 0 < first.screen_agreement()["checked"] < every.screen_agreement()["checked"]
    # how verdicts were reached is not a setting that stops a resume (a file of the
    # other signal is continued, not refused)
    again = run("screen", tmp_path / "every.json")
    assert again.curves()[0]["asr"] == every.curves()[0]["asr"]


def test_openings_of_other_prompts_keep_screen_first_off(text_tokenizer):
    """The refusal openings must be those of the prompts measured, index for index."""
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, PROMPTS)
    probe = _probe(model, text_tokenizer, judge, "screen")
    assert probe.screen_first
    other = _probe(model, text_tokenizer, judge, "screen")
    other.openings = type(probe.openings)(
        probe.openings.prompts[:12], probe.openings.token_ids[:12], probe.openings.responses[:12]
    )
    assert not other.screen_first
    result = other.evaluate(capability=False)
    assert result.signal == "generate" and result.total == 24


def test_signal_is_checked():
    with pytest.raises(ValueError, match="signal"):
        ProbeConfig(signal="fast")


def test_points_past_a_flagged_neighbour_generate_every_prompt_with_the_same_verdicts(
    tmp_path, text_tokenizer
):
    """The walk switches to generating every prompt after a point whose prompts the screen
    mostly flagged (or the judge mostly called unsafe); the curve is the one of generating
    everywhere. A switched point does not screen; a screen-first point checks some of the
    screen's refusals by generating them, and the file counts them in its screen record."""
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, PROMPTS[:12])
    config = LandscapeConfig(num_directions=1, alphas=(0.0, 0.1, 0.2, 0.3, 0.4), search="grid")

    def run(output, **options):
        probe = SafetyProbe(
            model,
            text_tokenizer,
            ProbeConfig(num_harmful=12, num_benign=0, max_new_tokens=8, **options),
            judge=judge,
        )
        land = compute_landscape(
            model, text_tokenizer, config, probe, output=tmp_path / output, progress=False
        )
        return land, {p["alpha"]: p for p in land.data["directions"][0]["points"]}

    every, _ = run("every.json", signal="generate")
    switched, points = run("switched.json", signal="screen", generate_above=0.25, screen_checks=2)
    assert switched.curves()[0]["asr"] == every.curves()[0]["asr"]
    for before, alpha in zip(config.alphas, config.alphas[1:], strict=False):
        expected = "generate" if flag_fraction(points[before]) >= 0.25 else "screen"
        assert points[alpha]["signal"] == expected, (alpha, points[before])
    signals = [p["signal"] for p in points.values()]
    assert "generate" in signals and "screen" in signals  # the switch fired, and not everywhere
    for p in points.values():
        if p["signal"] == "generate":
            assert "flagged_prompts" not in p and p["forward_tokens"] == 0
        else:
            settled = set(range(12)) - set(p["flagged_prompts"])
            assert set(p["checked_prompts"]) <= settled
            assert len(p["checked_prompts"]) == min(2, len(settled))
    record = switched.screen_agreement()
    assert record["points"] == signals.count("screen") and record["missed"] == 0
    assert record["checked"] == sum(len(p.get("checked_prompts", ())) for p in points.values())
    quiet, _ = run("quiet.json", signal="screen", screen=False)  # no checks: no record
    assert quiet.curves()[0]["asr"] == every.curves()[0]["asr"]
    assert quiet.screen_agreement() is None


def test_a_file_of_the_previous_defaults_is_resumed_by_the_new_ones(tmp_path, text_tokenizer):
    """Batching, the shared prefix and (with the keyword judge) how verdicts were reached do not
    change a verdict: a file measured by generating every prompt in batches of 16, written
    before the screen-first settings existed, is continued, not refused."""
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, PROMPTS[:12])
    config = LandscapeConfig(num_directions=1, alphas=(-0.2, 0.0, 0.2), search="grid")
    output = tmp_path / "old.json"

    def run(**options):
        settings = {"num_harmful": 12, "num_benign": 0, "max_new_tokens": 8, **options}
        probe = SafetyProbe(model, text_tokenizer, ProbeConfig(**settings), judge=judge)
        return compute_landscape(
            model, text_tokenizer, config, probe, output=output, progress=False
        )

    old = run(signal="generate", batch_size=16, share_prefix=False)
    data = json.loads(output.read_text())
    for name in ("share_prefix", "screen_checks", "generate_above", "screen_settles"):
        del data["probe"]["config"][name]
    data["directions"][0]["points"].pop()  # interrupted before its last point
    data["complete"] = False
    output.write_text(json.dumps(data))
    resumed = run()
    assert resumed.complete and resumed.curves()[0]["asr"] == old.curves()[0]["asr"]
    run(signal="generate", screen_checks=3)  # checks do not matter where nothing screens first
    with pytest.raises(LandscapeMismatchError, match="settings"):
        run(max_new_tokens=4)  # a decode budget changes verdicts: refused


def test_far_ends_learn_from_the_far_ends_measured_before(tmp_path, text_tokenizer):
    """A random direction's far end is predicted by the far ends already measured (its other
    side, the other directions: same distance from θ₀), not by its own origin."""
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, PROMPTS[:12])
    probe = SafetyProbe(
        model,
        text_tokenizer,
        ProbeConfig(num_harmful=12, num_benign=0, max_new_tokens=8, generate_above=0.25),
        judge=judge,
    )
    config = LandscapeConfig(num_directions=2, alphas=(-0.4, 0.0, 0.4), search="grid")
    land = compute_landscape(
        model, text_tokenizer, config, probe, output=tmp_path / "two.json", progress=False
    )
    first, second = ({p["alpha"]: p for p in d["points"]} for d in land.data["directions"])
    assert first[-0.4]["signal"] == "screen"  # only the origin was known: screen first
    assert flag_fraction(first[-0.4]) >= 0.25  # beyond this edge: the prediction is tested
    # the first line's far end at -0.4 predicts its other side and the second line's far ends
    assert first[0.4]["signal"] == second[-0.4]["signal"] == second[0.4]["signal"] == "generate"


def test_recorded_answers_and_zero_checks(text_tokenizer):
    """record_answers keeps every prompt's own answer, so it generates every prompt; without
    checks (screen_checks=0) a screen-first point records no screen agreement."""
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, PROMPTS)
    recorded = _probe(model, text_tokenizer, judge, "screen")
    recorded.config.record_answers = True
    assert not recorded.screen_first
    point = recorded.evaluate(per_prompt=True, capability=False)
    assert point.signal == "generate" and len(point.answers) == 24
    unchecked = _probe(model, text_tokenizer, judge, "screen")
    unchecked.config.screen_checks = 0
    point = unchecked.evaluate(per_prompt=True, capability=False)
    assert point.signal == "screen" and point.checked_prompts is None
    assert "checked_prompts" not in point.to_dict()
