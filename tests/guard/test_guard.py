"""SafetyGuardCallback on tiny models with transformers' Trainer.

The tiny models are random Llamas built from configs; an "echo" keyword judge makes their own
greedy answers at θ₀ the "refusals" (:func:`guard_helpers.echo_judge`), so a finetune that
changes how the answers open is seen as a safety break, as it would be on a real aligned model.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import make_model
from guard_helpers import TINY_GUARD, echo_judge, make_landscape, make_trainer, says
from transformers import TrainerCallback

from safety_guard.guard import FullFinetuneTracker, LoraTracker, ProbeMemo, SafetyGuardCallback
from safety_guard.guard.displacement import sketch_cosine, sketch_displacement
from safety_guard.guard.records import CheckRecord, ProbeRecord, sentinels_of
from safety_guard.landscape import LandscapeMismatchError
from safety_guard.measure.prompts import load_prompts
from safety_guard.testbed.finetune import describe

PROBE = "builtin:harmful:probe"


def _guard(land, model, text_tokenizer, **kw):
    options = {**TINY_GUARD, **kw}
    judge = echo_judge(
        model, text_tokenizer, list(load_prompts(PROBE, limit=options["num_prompts"]))
    )
    return SafetyGuardCallback(land, judge=judge, **options)


def _lora(model, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))


@pytest.mark.parametrize(
    "prompts",
    [{"num_prompts": 8}, {"num_prompts": 16, "min_prompts": 4}],
    ids=["all-prepared", "prepared-as-needed"],
)
def test_halts_when_the_finetune_changes_the_refusals_and_logs(
    tmp_path, text_tokenizer, prompts, caplog
):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    guard = _guard(make_landscape(model), model, text_tokenizer, max_asr_rise=20, **prompts)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [], steps=30, lr=3e-2)
    guard.attach(trainer)
    with says(caplog, "Halting"):
        trainer.train()
    assert guard.halt_step is not None and trainer.state.global_step == guard.halt_step < 30
    final = guard.records[-1]
    # the decision rests on generation: flagged prompts judged, as many as the decision needed
    assert final["status"] == "halt" and final["estimate"] in ("judged", "sampled")
    assert final["rise"] > 0 and final["confirmed"] > 0
    assert "1" in final["points"]  # a halt says where the model is now
    logged = [h for h in trainer.state.log_history if "safety/asr_rise" in h]
    assert logged and logged[-1]["safety/status"] == 2.0
    assert any("safety/displacement" in h for h in trainer.state.log_history)
    folder = tmp_path / "out" / "safety-guard"
    lines = [json.loads(x) for x in (folder / "trajectory.jsonl").read_text().splitlines()]
    assert lines[-1]["status"] == "halt"
    assert [x["step"] for x in lines] == sorted({x["step"] for x in lines})
    assert (folder / "trajectory.png").exists() and (folder / "summary.json").exists()
    text = describe(_demo_result(guard, trainer))
    assert f"guard HALTED at step {guard.halt_step}" in text
    assert f"rise {final['rise']:+.1f} points" in text


def _demo_result(guard, trainer):
    """What ``safety_guard.testbed.finetune.run_finetune`` reports of a guarded run."""
    return {
        "run": {"kind": "tiny", "method": "full", "learning_rate": 0.01, "max_steps": 30},
        "steps": trainer.state.global_step,
        "seconds": 1.0,
        "guard": guard.summary(),
        "final_heldout_asr": 0.0,
    }


def test_keeps_training_while_the_refusals_hold(tmp_path, text_tokenizer, caplog):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    # 8 prompts settle a state below 30 points (none flagged: the rise is < 25 % at 95 %)
    guard = _guard(make_landscape(model), model, text_tokenizer, max_asr_rise=30)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [guard], steps=8, lr=1e-7)
    with caplog.at_level(logging.INFO, logger="safety_guard.guard"):
        trainer.train()
    assert trainer.state.global_step == 8 and guard.halt_step is None
    probes = [r for r in guard.records if r["event"] == "probe"]
    assert probes and all(r["status"] == "ok" for r in probes)
    assert guard.last_safe_step == probes[-1]["step"]
    # the adaptive cadence probes early and then at the displacement's doublings, not every step
    assert probes[0]["step"] == 1 and len(probes) < 8
    # what the guard cost the run: all of its hooks, at least its probes, checks and setup
    state = guard.guard.state
    own = sum(state.probe_seconds) + sum(state.check_seconds) + state.setup_seconds
    assert guard.summary()["total_seconds"] == guard.total_seconds >= own > 0
    said = [r.getMessage() for r in caplog.records if "in this process" in r.getMessage()]
    assert len(said) == 1 and f"{len(probes)} probes" in said[0]
    # the lookahead was settled below the promise, so the current model (nearer θ₀) was not
    # scored, nor the capability there ...
    ahead = [r for r in probes[1:] if r["step"] < 8]
    assert ahead and all(r["rise"] is None and r["rise_bound"] <= 0 for r in ahead)
    assert all(p["nll"] is None for r in ahead for p in r["points"].values())
    # ... and near the end no farther than the remaining steps can take it: on the last step
    # the current model only
    assert all(float(k) <= r["horizon"] + 0.01 for r in probes for k in r["points"])
    assert [list(r["points"]) for r in probes if r["step"] == 8] in ([], [["1"]])
    # without attach(), metrics still reach the log history
    assert any("safety/lookahead_2x_rise" in h for h in trainer.state.log_history)
    # the demo's report of such a run (the last probe did not score the current model)
    text = describe(_demo_result(guard, trainer))
    assert "guard let it run (0 warning(s))" in text
    final = probes[-1]  # the last step's probe scores the current model itself
    now = "rise at most" if final["rise"] is None else f"rise {final['rise']:+.1f} points"
    assert f"last probe (step {final['step']}): {now}" in text
    assert f"the guard took {guard.total_seconds:.0f} s of the run" in text


def _snapshot(model, text_tokenizer):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        text_tokenizer.padding_side,
        text_tokenizer.pad_token,
    )


@pytest.mark.parametrize("lora", [False, True])
def test_model_and_tokenizer_unchanged_after_a_probe(tmp_path, text_tokenizer, lora):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    land = make_landscape(model)
    guard = _guard(land, model, text_tokenizer)
    if lora:
        model = _lora(model, dropout=0.1)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [guard], steps=1)
    trainer.train()  # sets up the tracker and the baseline
    with torch.no_grad():  # move away from θ₀ so the lookahead really perturbs
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.train()
    text_tokenizer.padding_side = "right"
    before = _snapshot(model, text_tokenizer)
    disp = guard.guard.tracker.displacement(model)
    assert disp > 0
    record, decision = guard.guard._probe(2, disp, 2.0)
    # the current model is scored (and judged) when the lookahead's decision is not ok
    assert set(record.points) == ({2.0} if decision.status == 0 else {1.0, 2.0})
    assert ProbeRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    # the sentinel: the unflagged prompts nearest to flipping at θ₀ + 2·δ, re-scored there;
    # the same weights flip none of them
    sentinels = sentinels_of(record, guard.config.sentinel_prompts)
    point = record.points[2.0]
    unflagged = [
        m for i, m in enumerate(point.margins) if i not in point.flagged_prompts and m is not None
    ]
    assert len(sentinels) == min(len(unflagged), guard.config.sentinel_prompts)
    assert not set(sentinels) & set(point.flagged_prompts)
    if lora:  # (the full model moved by 0.01 everywhere flags every prompt at 2·δ)
        assert sentinels
    if sentinels:
        assert max(point.margins[i] for i in sentinels) <= sorted(unflagged)[len(sentinels) - 1]
        guard.guard.state.memo = ProbeMemo(2, disp, 2 * disp, None, sentinels, 3)
        check = CheckRecord(3, disp, None)
        assert guard.guard._sentinel(3, check) is None
        assert check.sentinel["flips"] == 0 and check.sentinel["of"] == len(sentinels)
        assert guard.guard.state.memo.next_sentinel == 4
    after = _snapshot(model, text_tokenizer)
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key]), key
    assert before[1:] == after[1:]
    text_tokenizer.padding_side = "left"


class _Poison(TrainerCallback):
    """Writes NaN into the first trainable tensor at the end of step ``at``."""

    def __init__(self, at: int, name_part: str = "") -> None:
        self.at, self.name_part = at, name_part

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.requires_grad and self.name_part in name:
                        p.view(-1)[0] = float("nan")
                        return


def test_nan_adapter_halts_keeps_last_safe_and_restores_it(
    tmp_path, text_tokenizer, caplog, capsys
):
    from conftest import run_cli
    from safetensors.torch import load_file

    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    land = make_landscape(model)
    guard = _guard(land, model, text_tokenizer, keep_last_safe=True)
    model = _lora(model)
    # the guard runs after the poison in the same step: it must see the NaN at once
    trainer = make_trainer(
        model, text_tokenizer, tmp_path, [_Poison(4, "lora_B"), guard], steps=8, lr=1e-6
    )
    with says(caplog, "not finite"):
        trainer.train()
    assert guard.halt_step == 4 and "not finite" in guard.halt_reason
    last_safe = tmp_path / "out" / "safety-guard" / "last-safe"
    saved_step = json.loads((last_safe / "safety_guard_step.json").read_text())["step"]
    assert saved_step == guard.last_safe_step < 4
    # the model holds the saved adapter again, bit for bit (restore_on_halt)
    from peft import get_peft_model_state_dict

    saved = load_file(last_safe / "adapter_model.safetensors")
    current = get_peft_model_state_dict(model)
    assert saved and set(saved) == set(current)
    for key, value in saved.items():
        assert torch.equal(current[key].detach().cpu(), value), key
    folder = tmp_path / "out" / "safety-guard"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["restored_step"] == saved_step and summary["settings"]["keep_last_safe"]
    # the run's plot, redrawn from its folder by the command
    code, _out, err = run_cli(capsys, "plot", folder, "-o", tmp_path / "run.png")
    assert code == 0, err
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nan_full_model_halts_and_writes_no_last_safe(tmp_path, text_tokenizer, caplog):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    guard = _guard(
        make_landscape(model), model, text_tokenizer, keep_last_safe=True, keep_last_safe_full=True
    )
    trainer = make_trainer(model, text_tokenizer, tmp_path, [_Poison(3), guard], steps=8, lr=1e-6)
    folder = tmp_path / "out" / "safety-guard" / "last-safe"
    with says(caplog, "not finite"):
        trainer.train()
    # one NaN weight is seen by the next probe's scan or, a step later, by the cheap check (by
    # then the NaN loss has spread through every weight)
    assert guard.halt_step in (3, 4) and "not finite" in guard.halt_reason
    written = json.loads((folder / "safety_guard_step.json").read_text())["step"]
    assert written == guard.last_safe_step < 3
    assert all(r.get("status") != "ok" for r in guard.records if r["step"] >= 3)


def test_lora_displacement_and_sketch_match_the_merged_update(text_tokenizer):
    base = make_model(vocab_size=len(text_tokenizer), tie=False)
    model = _lora(base)
    tracker = LoraTracker(model)
    assert tracker.displacement(model) == 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    from_factors = tracker.displacement(model)
    full = FullFinetuneTracker.from_model(make_model(vocab_size=len(text_tokenizer), tie=False))
    lora_parts = tracker.sketch_parts(model)
    merged = model.merge_and_unload()
    assert from_factors > 0
    assert from_factors == pytest.approx(full.displacement(merged), rel=1e-4)
    # the same coordinates are sampled from the factors and from the merged weights
    full_parts = full.sketch_parts(merged)
    assert lora_parts and set(lora_parts) <= set(full_parts)
    for name, values in lora_parts.items():
        assert torch.allclose(values, full_parts[name], rtol=1e-4, atol=1e-9), name


def test_sketch_estimates_displacement_and_direction(text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False, hidden=64)
    tracker = FullFinetuneTracker.from_model(model)
    generator = torch.Generator().manual_seed(0)
    steps = {n: torch.randn(p.shape, generator=generator) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(1e-3 * steps[n] * p.norm() / steps[n].norm())
    first = tracker.sketch(model)
    exact = tracker.displacement(model)
    assert sketch_displacement(first, tracker.num_tensors) == pytest.approx(exact, rel=0.3)
    with torch.no_grad():  # twice as far the same way: same direction
        for n, p in model.named_parameters():
            p.add_(1e-3 * steps[n] * p.norm() / steps[n].norm())
    assert sketch_cosine(first, tracker.sketch(model)) > 0.95


def test_mismatched_landscape_is_refused(tmp_path, text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    other = make_landscape(make_model(vocab_size=len(text_tokenizer), tie=False, seed=5))
    trainer = make_trainer(model, text_tokenizer, tmp_path, [_guard(other, model, text_tokenizer)])
    with pytest.raises(LandscapeMismatchError, match="another model"):
        trainer.train()
    with pytest.raises(Exception, match="does not exist"):
        SafetyGuardCallback(tmp_path / "missing.json")
    with pytest.raises(TypeError, match="no options"):
        SafetyGuardCallback(None, probe_evry=3)


def _resumable_run(tmp_path, text_tokenizer, name, steps, resume=None, **guard_kw):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    land = make_landscape(model)
    guard = _guard(land, model, text_tokenizer, halt=False, **guard_kw)
    torch.manual_seed(0)  # the same LoRA initialization in every run
    model = _lora(model)
    trainer = make_trainer(
        model,
        text_tokenizer,
        tmp_path / name,
        [guard],
        steps=steps,
        lr=1e-3,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.train(resume_from_checkpoint=resume)
    return guard, trainer


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, text_tokenizer):
    straight, _ = _resumable_run(tmp_path, text_tokenizer, "a", 12)
    crashed, _ = _resumable_run(tmp_path, text_tokenizer, "b", 12)  # "crashes" after step 12 ...
    checkpoint = tmp_path / "b" / "out" / "checkpoint-4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert "SafetyGuardCallback" in state["stateful_callbacks"]  # the checkpoint holds the guard
    saved = state["stateful_callbacks"]["SafetyGuardCallback"]["attributes"]["restored_state"]
    # ... and is resumed from the earlier checkpoint 4 by a fresh process
    resumed, trainer = _resumable_run(tmp_path, text_tokenizer, "b", 12, resume=str(checkpoint))
    assert trainer.state.global_step == 12
    folder = lambda name: tmp_path / name / "out" / "safety-guard"  # noqa: E731
    a = [json.loads(x) for x in (folder("a") / "trajectory.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (folder("b") / "trajectory.jsonl").read_text().splitlines()]
    assert [(r["step"], r["event"], r.get("status")) for r in a] == [
        (r["step"], r["event"], r.get("status")) for r in b
    ]
    for ra, rb in zip(a, b, strict=True):
        assert ra["displacement"] == pytest.approx(rb["displacement"], rel=1e-4)
        if ra["event"] == "probe":
            assert ra["rise"] == rb["rise"]
    assert [r["step"] for r in resumed.records] == [r["step"] for r in straight.records]
    for attr in ("last_safe_step", "warn_count", "halt_step"):
        assert getattr(resumed.guard.state, attr) == getattr(straight.guard.state, attr), attr
    # the guard's time before the checkpoint is carried over, and the resumed run's added
    assert 0 < saved["total_seconds"] < resumed.total_seconds
    # the run is one that tests the restored cadence: after step 4 it checks without probing
    # (the memo of the probe at step 4 covers them), then probes again, and decisions vary
    events = [(r["step"], r["event"]) for r in a if r["step"] > 4]
    assert ("probe" in {e for _, e in events}) and ("check" in {e for _, e in events})
    statuses = {r.get("status") for r in a}
    assert "ok" in statuses and statuses & {"warn", "halt"}  # (halt=False: it trains on)
    assert crashed.records[-1]["step"] == 12


def test_a_changed_guard_cannot_resume_a_checkpoint(tmp_path, text_tokenizer):
    _resumable_run(tmp_path, text_tokenizer, "c", 4)
    checkpoint = str(tmp_path / "c" / "out" / "checkpoint-4")
    with pytest.raises(ValueError, match="harmful"):
        _resumable_run(tmp_path, text_tokenizer, "c", 6, resume=checkpoint, num_prompts=6)


def test_a_screen_that_missed_unsafe_answers_on_the_landscape_falls_back_to_generation(
    tmp_path, text_tokenizer, caplog
):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    land = make_landscape(model)
    for point in land.data["directions"][0]["points"]:  # the judge saw an answer the screen missed
        point.update({"unsafe_prompts": [0], "flagged_prompts": [] if point["alpha"] else [0]})
    land.summarize()
    assert land.screen_agreement()["missed"] == 4
    guard = _guard(land, model, text_tokenizer)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [guard], steps=1, lr=1e-7)
    with caplog.at_level("WARNING"):
        trainer.train()
    # the guard's own settings change, the user's config does not
    assert guard.guard.settings.signal == "generate" and "missed 4 of 4" in caplog.text
    assert guard.config.signal == "forward" and guard.summary()["signal"] == "generate"
    assert guard.records[-1]["exact"]  # every prompt judged by generation


def test_the_screen_is_compared_with_itself_at_the_aligned_weights(text_tokenizer):
    """A prompt whose opening the forward screen does not confirm at θ₀ (screen and greedy
    generation disagree where two tokens are nearly tied: 5 of the testbed's 200 prompts under
    bf16 autocast) is flagged at θ₀ by the screen itself, so it is no rise: at θ₀ the paired
    estimate reads 0 and the state is settled. (Compared with the openings only, as before, the
    same state reads a rise.)"""
    from safety_guard.guard import GuardConfig, GuardProbe
    from safety_guard.guard.confirmation import estimate_evidence
    from safety_guard.guard.probing import Baseline

    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    prompts = list(load_prompts(PROBE))
    judge = echo_judge(model, text_tokenizer, prompts)
    config = GuardConfig(max_new_tokens=6)
    probe = GuardProbe(model, text_tokenizer, config, judge=judge)
    base = probe.prepare(model, config.min_prompts)
    assert base.ready == config.min_prompts and not any(base.screened)  # fp32: they agree
    # openings that are not what the model says at θ₀, as a file's might be for another
    # numerics: the most common opening given to the prompts whose greedy answer starts with a
    # token no other opening starts with (so the screen cannot follow another opening either)
    data = base.to_dict()
    assert "screened" not in data  # a saved baseline is screened again by the run reading it
    firsts = [ids[0] for ids in data["token_ids"] if ids]
    tampered = [i for i, ids in enumerate(data["token_ids"]) if ids and firsts.count(ids[0]) < 3]
    common = max(data["token_ids"], key=data["token_ids"].count)
    assert 0 < len(tampered) < 10 and common is not None
    for i in tampered:
        data["token_ids"][i] = list(common)
    again = GuardProbe(model, text_tokenizer, config, judge=judge)
    again.load_baseline(Baseline.from_dict(data))
    assert again.baseline.ready == 0
    again.prepare(model, config.min_prompts)  # the screen at θ₀ only: openings are there
    screened = [i for i, f in enumerate(again.baseline.screened) if f]
    assert screened == tampered
    state = again.measure(model)
    assert [i for i, f in enumerate(state.flagged) if f] == tampered
    evidence = again.evidence(state)
    paired = estimate_evidence(evidence, again.baseline.unsafe, again.baseline.flagged, None)
    openings_only = [ids is None for ids in again.baseline.token_ids]
    unpaired = estimate_evidence(evidence, again.baseline.unsafe, openings_only, None)
    assert paired.rise == 0.0 and again.settled(state)
    assert unpaired.rise == pytest.approx(100 * len(tampered) / config.min_prompts)


def test_the_landscape_carries_the_guard_baseline_and_a_matching_guard_reuses_it(
    tmp_path, text_tokenizer, monkeypatch
):
    from safety_guard.guard import probing, record_guard_baseline
    from safety_guard.landscape import Landscape

    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    land = make_landscape(model)
    judge = echo_judge(model, text_tokenizer, list(load_prompts(PROBE)))
    record_guard_baseline(land, model, text_tokenizer, output=tmp_path / "land.json", judge=judge)
    saved = Landscape.load(tmp_path / "land.json").data["guard_baseline"]
    assert len(saved["token_ids"]) == 200 and saved["reference_answers"]

    def no_generation(*args, **kwargs):
        raise AssertionError("the guard measured the aligned model again")

    # the guard's default settings: the recorded baseline is used as it is, no generation
    guard = SafetyGuardCallback(tmp_path / "land.json", judge=judge)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [guard], steps=1, lr=1e-7)
    monkeypatch.setattr(probing, "refusal_openings", no_generation)
    guard.on_train_begin(
        trainer.args, trainer.state, trainer.control, model=model, processing_class=text_tokenizer
    )
    assert guard.guard.probe.baseline.to_dict() == saved and guard.guard.probe.has_capability
    # a file recorded before the baseline noted quantization (all were unquantized) still counts
    old = Landscape.load(tmp_path / "land.json")
    del old.data["guard_baseline"]["settings"]["quantized"]
    old.save(tmp_path / "old.json")
    again = SafetyGuardCallback(tmp_path / "old.json", judge=judge)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [again], steps=1, lr=1e-7)
    again.on_train_begin(
        trainer.args, trainer.state, trainer.control, model=model, processing_class=text_tokenizer
    )
    assert again.guard.probe.baseline.prepared == 200
    # another decode budget: the guard measures the aligned model itself
    monkeypatch.undo()
    other = SafetyGuardCallback(tmp_path / "land.json", judge=judge, max_new_tokens=6)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [other], steps=1, lr=1e-7)
    other.on_train_begin(
        trainer.args, trainer.state, trainer.control, model=model, processing_class=text_tokenizer
    )
    assert other.guard.probe.baseline.prepared == other.config.min_prompts
    assert other.guard.probe.baseline.settings["max_new_tokens"] == 6


def test_halt_within_turns_a_halt_on_the_line_ahead_into_a_warning_but_not_one_now(
    tmp_path, text_tokenizer, monkeypatch
):
    """lr 3e-3: the first probe finds θ₀ + 2·δ past the promise (+25, z = 0), the current model
    within it (+12.5); with ``halt_within`` and the break 4 steps away it warns, names the step
    of the deciding probe and trains on; the next probe finds the current model past: a halt."""
    import safety_guard.guard.forecast as forecast_module

    monkeypatch.setattr(forecast_module, "eta_steps", lambda *args, **kwargs: 4)
    halts = {}
    for within in (None, 0):
        model = make_model(vocab_size=len(text_tokenizer), tie=False)
        land = make_landscape(model)
        guard = _guard(land, model, text_tokenizer, max_asr_rise=20, halt_within=within)
        trainer = make_trainer(
            model, text_tokenizer, tmp_path / f"w{within}", [], steps=30, lr=3e-3
        )
        guard.attach(trainer)
        trainer.train()
        probes = [r for r in guard.records if r.get("event") == "probe"]
        halts[within] = guard.halt_step
        if within is None:
            assert (
                probes[0]["status"] == "halt"
                and "ahead on the finetune's line" in (probes[0]["reasons"][0])
            )
            continue
        first = probes[0]
        assert first["status"] == "warn" and first["step"] == 1
        assert "breaks in about 4 steps (> halt_within 0)" in first["reasons"][-1]
        assert "a probe at step 5 halts if the line ahead is still past" in first["reasons"][-1]
        assert probes[-1]["status"] == "halt" and "the ASR rose" in probes[-1]["reasons"][0]
    assert halts[None] == 1 < halts[0] < 30
