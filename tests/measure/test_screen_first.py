"""Screen first, generate the flagged: the same verdicts as generating every prompt, for less."""

from __future__ import annotations

import json

import pytest
from conftest import make_model
from guard_helpers import echo_judge

from safety_guard.landscape import LandscapeConfig, compute_landscape
from safety_guard.landscape.directions import RandomDirection
from safety_guard.landscape.perturb import WeightPerturbation
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

    def run(signal, output):
        probe = SafetyProbe(
            model,
            text_tokenizer,
            ProbeConfig(num_harmful=12, num_benign=0, max_new_tokens=8, signal=signal),
            judge=judge,
        )
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
    # screen-first points cannot miss an unsafe answer: they do not calibrate the screen
    assert first.screen_agreement() is None and every.screen_agreement()["missed"] == 0
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
