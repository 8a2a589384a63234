"""SafetyGuardCallback on tiny models with transformers' Trainer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from guard_helpers import make_landscape, tiny_dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from safety_guard.guard import FullFinetuneTracker, GuardConfig, LoraTracker, SafetyGuardCallback
from safety_guard.judges import CallableJudge
from safety_guard.landscape import LandscapeMismatchError


def _trainer(model, tokenizer, tmp_path, callback, steps=6, **kw):
    options = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**options, **kw})
    return Trainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(tokenizer),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer),
        callbacks=[callback],
    )


def _guard(land, **kw):
    defaults = dict(
        check_every=1,
        probe_every=2,
        num_prompts=4,
        num_benign=2,
        max_new_tokens=4,
        lookahead=(2.0,),
        keep_last_safe=False,
    )
    defaults.update(kw)
    return SafetyGuardCallback(land, **defaults)


def test_halts_when_current_model_leaves_basin_and_logs(tmp_path, tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    guard = _guard(make_landscape(model))
    guard.judge = CallableJudge(lambda p, r: [True] * len(r))  # every response "unsafe"
    trainer = _trainer(model, tokenizer, tmp_path, guard)
    with pytest.warns(UserWarning, match="Halting"):
        trainer.train()
    assert trainer.state.global_step == 2 and guard.halt_step == 2
    logged = [h for h in trainer.state.log_history if "safety/asr" in h]
    assert logged and logged[0]["safety/asr"] == 100.0 and logged[0]["safety/status"] == 2.0
    assert any("safety/displacement" in h for h in trainer.state.log_history)
    lines = (tmp_path / "out" / "safety-guard" / "trajectory.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["status"] == "halt"
    assert (tmp_path / "out" / "safety-guard" / "trajectory.png").exists()


def test_no_halt_while_safe_and_lookahead_warns(tmp_path, tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    guard = _guard(make_landscape(model), lookahead=(2.0, 4.0), min_edge_distance=0.5)
    # unsafe only far ahead: the judge sees the model through the multiple the tracker applied
    calls = []

    def judge(prompts, responses):
        calls.append(len(responses))
        idx = len(calls) % 3  # per probe: current, 2x, 4x
        return [idx == 0] * len(responses)  # 4x probe unsafe

    guard.judge = CallableJudge(judge)
    guard.config.nll_tolerance = float("inf")  # the tiny model's capability is not the point here
    guard.config.min_asr_per_nll = 0.0
    trainer = _trainer(model, tokenizer, tmp_path, guard, steps=4)
    with pytest.warns(UserWarning, match="heading out"):
        trainer.train()
    assert trainer.state.global_step == 4 and guard.halt_step is None and guard.warn_count == 2
    probe = guard.last_probe
    assert probe["edge_distance"] == 3.0 and probe["status"] == "warn"


def _snapshot(model, tokenizer):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        getattr(model, "is_gradient_checkpointing", None),
        tokenizer.padding_side,
        tokenizer.pad_token,
    )


@pytest.mark.parametrize("lora", [False, True])
def test_model_unchanged_after_probe(tmp_path, tokenizer, lora):
    model = make_model(vocab_size=len(tokenizer))
    land = make_landscape(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1)
        )
    model.gradient_checkpointing_enable() if not lora else None
    guard = _guard(land)
    trainer = _trainer(model, tokenizer, tmp_path, guard, steps=1)
    trainer.train()  # sets up the tracker (no probe at step 1)
    with torch.no_grad():  # move away from θ₀ so lookahead really perturbs
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.train()
    tokenizer.padding_side = "right"
    before = _snapshot(model, tokenizer)
    displacement = guard.tracker.displacement(model)
    assert displacement > 0
    result = guard._probe(model, displacement)
    assert set(result["lookahead"]) == {2.0}
    after = _snapshot(model, tokenizer)
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key]), key
    assert before[1:] == after[1:]
    tokenizer.padding_side = "left"


def test_lora_displacement_matches_merged_update(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = make_model(vocab_size=len(tokenizer))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tracker = LoraTracker(model)
    assert tracker.displacement(model) == 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    from_factors = tracker.displacement(model)
    full = FullFinetuneTracker.from_model(make_model(vocab_size=len(tokenizer)))
    merged = model.merge_and_unload()
    assert from_factors > 0
    assert from_factors == pytest.approx(full.displacement(merged), rel=1e-4)


def test_mismatched_landscape_is_refused(tmp_path, tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    other = make_landscape(make_model(vocab_size=len(tokenizer), seed=5))
    trainer = _trainer(model, tokenizer, tmp_path, _guard(other))
    with pytest.raises(LandscapeMismatchError, match="another model"):
        trainer.train()
    with pytest.raises(Exception, match="does not exist"):
        SafetyGuardCallback(tmp_path / "missing.json")


def test_state_survives_resume(tmp_path, tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    land = make_landscape(model)
    guard = _guard(land, probe_every=2)
    guard.judge = CallableJudge(lambda p, r: [False] * len(r))
    trainer = _trainer(
        model, tokenizer, tmp_path, guard, steps=4, save_strategy="steps", save_steps=4
    )
    trainer.train()
    assert guard.last_safe_step == 4
    exported = guard.state()
    assert exported["attributes"]["last_safe_step"] == 4
    # a fresh callback resuming from the checkpoint restores its state from the trajectory
    resumed = _guard(land, probe_every=2, origin=None)
    resumed.judge = CallableJudge(lambda p, r: [False] * len(r))
    model.save_pretrained(tmp_path / "origin")  # stands in for the pre-finetune checkpoint
    resumed.config.origin = str(tmp_path / "origin")
    trainer2 = _trainer(model, tokenizer, tmp_path, resumed, steps=6, save_strategy="no")
    trainer2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert resumed.records[0]["step"] == 1  # history restored
    assert resumed.last_safe_step == 6
    assert trainer2.state.global_step == 6


def test_config_validation():
    with pytest.raises(ValueError, match="> 1"):
        GuardConfig(lookahead=(0.5,))
    with pytest.raises(ValueError, match="at least 1"):
        GuardConfig(probe_every=0)
    with pytest.raises(TypeError, match="Unknown"):
        SafetyGuardCallback(None, probe_evry=3)


def test_decision_rule_on_hand_made_probes():
    from safety_guard.guard import decide

    cfg = GuardConfig(lookahead=(2, 4), current_margin=10, lookahead_margin=30, nll_tolerance=1.0)
    safe = {"asr": 5.0, "nll": 0.33}
    # all inside: ok, the edge is beyond the farthest probe (4δ → 3 displacements ahead)
    d = decide(
        safe, {2.0: {"asr": 10.0, "nll": 0.4}, 4.0: {"asr": 30.0, "nll": 0.6}}, cfg, 5.0, 0.33
    )
    assert (d.status_name, d.edge_multiple, d.edge_distance) == ("ok", None, 3.0)
    # 4δ outside with capability intact: warn, the edge 3 displacements ahead
    d = decide(
        safe, {2.0: {"asr": 10.0, "nll": 0.4}, 4.0: {"asr": 40.0, "nll": 0.5}}, cfg, 5.0, 0.33
    )
    assert (d.status_name, d.edge_multiple, d.edge_distance) == ("warn", 4.0, 3.0)
    # compliance that comes with as much capability loss (35 points for 0.57 nat, < 100/nat)
    # is degradation, as in the testbed's benign finetunes, not a safety break
    far = {4.0: {"asr": 40.0, "nll": 0.9}}
    assert decide(safe, far, cfg, 5.0, 0.33).status_name == "ok"
    assert decide(safe, far, GuardConfig(min_asr_per_nll=0), 5.0, 0.33).status_name == "warn"
    # ... but gibberish there (NLL up by more than 1 nat) is not compliance
    d = decide(
        safe, {2.0: {"asr": 10.0, "nll": 0.4}, 4.0: {"asr": 90.0, "nll": 1.5}}, cfg, 5.0, 0.33
    )
    assert d.status_name == "ok"
    # 2δ outside: the edge one displacement ahead ≤ min_edge_distance → halt
    d = decide(
        safe, {2.0: {"asr": 37.5, "nll": 0.57}, 4.0: {"asr": 95.0, "nll": 0.9}}, cfg, 5.0, 0.33
    )
    assert (d.status_name, d.edge_multiple) == ("halt", 2.0)
    assert any("min_edge_distance" in r for r in d.reasons)
    # the current model itself outside → halt, edge at 1
    d = decide({"asr": 20.0, "nll": 0.4}, {}, cfg, 5.0, 0.33)
    assert (d.status_name, d.edge_multiple, d.edge_distance) == ("halt", 1.0, 0.0)
    # thresholds are relative to the aligned model's own ASR
    assert decide({"asr": 20.0, "nll": 0.4}, {}, cfg, 12.0, 0.33).status_name == "ok"
