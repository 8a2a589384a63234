"""``Guard`` in a plain PyTorch loop: no Trainer, the same decisions, files and state."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from guard_helpers import TINY_GUARD, make_landscape, says, train_loop

from safety_guard import Guard, GuardDecision
from safety_guard.guard import GuardConfig


@pytest.mark.parametrize("lora", [False, True])
def test_a_plain_loop_halts_on_a_nan_weight_and_writes_its_summary(
    tmp_path, text_tokenizer, caplog, lora
):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    land = make_landscape(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    guard = Guard(model, text_tokenizer, land, output_dir=tmp_path / "guard", **TINY_GUARD)
    with says(caplog, "Halting training"):
        decisions = train_loop(model, text_tokenizer, guard, steps=12, poison_at=6)
    last = decisions[-1]
    # the cheap check sees the NaN weight at once, or the next step's loss is NaN
    assert last.halt and last.status == "halt"
    assert "not finite" in last.reason or "loss is nan" in last.reason, last.reason
    assert last.step in (6, 7) and guard.state.halt_step == last.step
    assert all(d.status == "ok" and not d.halt for d in decisions[:-1])
    assert all("safety/displacement" in d.metrics for d in decisions[:-1])
    assert decisions[0].probed  # the first step is probed
    assert guard.schedule is not None  # the linear decay was read ahead
    summary = guard.end()
    written = json.loads((tmp_path / "guard" / "summary.json").read_text())
    assert written["halt_step"] == summary["halt_step"] == last.step
    assert written["horizon_counts"] == "learning rate" and written["signal"] == "forward"
    records = (tmp_path / "guard" / "trajectory.jsonl").read_text().splitlines()
    checked = [d.step for d in decisions if "loss" not in (d.reason or "")]  # (a loss: no check)
    assert [json.loads(r)["step"] for r in records] == checked
    if lora:  # the last safe adapter is back in the model: finite again
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_guard_state_resumes_a_plain_loop(tmp_path, text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    land = make_landscape(model)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    first = Guard(model, text_tokenizer, land, output_dir=tmp_path / "guard", **TINY_GUARD)
    train_loop(model, text_tokenizer, first, steps=4)
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert saved["step"] == 4 and saved["baseline"] is not None

    again = Guard(model, text_tokenizer, land, output_dir=tmp_path / "guard", **TINY_GUARD)
    again.load_state_dict(saved)
    again.begin(max_steps=8, step=4)
    assert again.state.last_safe_step == first.state.last_safe_step
    assert again.state.memo == first.state.memo
    assert again.state.records == first.state.records  # read back from the trajectory file
    assert again.probe.baseline.to_dict() == first.probe.baseline.to_dict()
    with pytest.raises(RuntimeError, match=r"before Guard\.begin"):
        again.load_state_dict(saved)


def test_the_guard_says_how_to_use_it_and_never_changes_the_config(tmp_path, text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    config = GuardConfig(**TINY_GUARD)
    guard = Guard(model, text_tokenizer, make_landscape(model), config, max_asr_rise=5)
    assert guard.config.max_asr_rise == 5 and config.max_asr_rise == 10
    with pytest.raises(RuntimeError, match=r"Guard\.begin\(\)"):
        guard.step(1)
    with pytest.raises(ValueError, match="version"):
        guard.load_state_dict({"version": 99})
    with pytest.raises(TypeError, match="Guard options"):
        Guard(model, text_tokenizer, max_asr_rise=5, no_such_option=1)
    text_tokenizer.chat_template, template = None, text_tokenizer.chat_template
    try:
        with pytest.raises(ValueError, match="chat template"):
            Guard(model, text_tokenizer)
    finally:
        text_tokenizer.chat_template = template
    assert GuardDecision(step=1).event is False
