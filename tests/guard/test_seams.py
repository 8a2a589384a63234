"""Where a user's script meets the guard: their logs, resumes, settings and files come out whole.

Tiny Llamas built from configs, the "echo" judge of :mod:`guard_helpers` (the model's own greedy
answers at θ₀ are its refusals), a plain ``Trainer`` and TRL's ``SFTTrainer``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import warnings

import pytest
from conftest import make_model
from guard_helpers import TINY_GUARD, echo_judge, make_landscape, make_trainer, says
from transformers import TrainerCallback

from safety_guard.guard import GuardConfig, SafetyGuardCallback
from safety_guard.guard.trajectory import append_record, read_records, truncate_after
from safety_guard.landscape import LandscapeFileError
from safety_guard.measure.judges import KeywordJudge
from safety_guard.measure.prompts import load_prompts

PROBE = "builtin:harmful:probe"
OPTIONS = TINY_GUARD


class Recorder(TrainerCallback):
    """Stands in for a logger (W&B, TensorBoard): every entry its ``on_log`` receives."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.entries.append((state.global_step, dict(logs or {})))


def _guard(model, tokenizer, judge=None, **kw) -> SafetyGuardCallback:
    options = {**OPTIONS, **kw}
    if judge is None:
        judge = echo_judge(
            model, tokenizer, list(load_prompts(PROBE, limit=options["num_prompts"]))
        )
    return SafetyGuardCallback(make_landscape(model), judge=judge, **options)


def _trainer_entries(entries):
    return [(step, e) for step, e in entries if not any(k.startswith("safety/") for k in e)]


def _plain_run(tmp_path, tokenizer, wiring: str | None, name: str, **train_kw):
    """6 steps, logging every 2, with a Recorder; the guard wired as asked (or none)."""
    model = make_model(vocab_size=len(tokenizer), tie=False)
    recorder = Recorder()
    guard = _guard(model, tokenizer, max_asr_rise=50) if wiring else None
    callbacks = [recorder, guard] if wiring == "callbacks" else [recorder]
    options = dict(steps=6, lr=1e-7, logging_steps=2, **train_kw)
    trainer = make_trainer(model, tokenizer, tmp_path / name, callbacks, **options)
    if wiring == "attach":
        guard.attach(trainer)
    trainer.train()
    return trainer, recorder, guard


@pytest.mark.parametrize("wiring", ["callbacks", "attach"])
def test_the_trainers_own_logs_are_untouched_and_safety_metrics_reach_the_loggers(
    tmp_path, text_tokenizer, wiring
):
    _, plain_rec, _ = _plain_run(tmp_path, text_tokenizer, None, "plain")
    guarded, rec, guard = _plain_run(tmp_path, text_tokenizer, wiring, wiring)
    expected = [(s, sorted(e)) for s, e in _trainer_entries(plain_rec.entries)]
    assert [s for s, e in expected if "loss" in e] == [2, 4, 6]
    # the Trainer's entries: the same steps, the same keys, the same values as without the guard
    assert [(s, sorted(e)) for s, e in _trainer_entries(rec.entries)] == expected
    losses = [e["loss"] for _, e in _trainer_entries(rec.entries) if "loss" in e]
    plain_losses = [e["loss"] for _, e in _trainer_entries(plain_rec.entries) if "loss" in e]
    assert losses == pytest.approx(plain_losses, rel=1e-6)
    history = [h for h in guarded.state.log_history if "loss" in h]
    assert [h["step"] for h in history] == [2, 4, 6]
    # the guard's entries reach the logger: at every logging step and at every probe
    safety = [(s, e) for s, e in rec.entries if any(k.startswith("safety/") for k in e)]
    assert all(all(k.startswith("safety/") for k in e) for _, e in safety)
    probe_steps = {r["step"] for r in guard.records if r["event"] == "probe"}
    assert {s for s, _ in safety} == probe_steps | {2, 4, 6}
    assert all("safety/displacement" in e for _, e in safety)
    assert [s for s, _ in safety] == [
        h["step"] for h in guarded.state.log_history if "safety/displacement" in h
    ]


@pytest.mark.parametrize("wiring", ["callbacks", "attach"])
def test_sft_trainer_keeps_its_metrics_in_its_own_entries(tmp_path, text_tokenizer, wiring):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    recorder = Recorder()
    guard = _guard(model, text_tokenizer, max_asr_rise=50)
    data = Dataset.from_dict({"text": [f"question {i} answer {i % 3}" for i in range(16)]})
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=4,
        learning_rate=1e-7,
        per_device_train_batch_size=4,
        logging_steps=2,
        max_length=32,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=text_tokenizer,
        callbacks=[recorder, guard] if wiring == "callbacks" else [recorder],
    )
    if wiring == "attach":
        guard.attach(trainer)
    trainer.train()
    own = [e for _, e in _trainer_entries(recorder.entries) if "loss" in e]
    assert [s for s, e in _trainer_entries(recorder.entries) if "loss" in e] == [2, 4]
    assert len(own) == 2 and all("mean_token_accuracy" in e and "num_tokens" in e for e in own)
    safety = [e for _, e in recorder.entries if "safety/displacement" in e]
    assert safety and not any("mean_token_accuracy" in e or "loss" in e for e in safety)


def test_restoring_callbacks_from_the_checkpoint_is_refused_by_name(tmp_path, text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    guard = _guard(model, text_tokenizer)
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint=False"):
        make_trainer(
            model, text_tokenizer, tmp_path, [guard], restore_callback_states_from_checkpoint=True
        )
    trainer = make_trainer(
        model, text_tokenizer, tmp_path, [], restore_callback_states_from_checkpoint=True
    )
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        guard.attach(trainer)


def test_two_guards_on_one_trainer_are_refused(tmp_path, text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, list(load_prompts(PROBE, limit=8)))
    first, second = _guard(model, text_tokenizer, judge), _guard(model, text_tokenizer, judge)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [first])
    with pytest.raises(ValueError, match="already has a SafetyGuardCallback"):
        second.attach(trainer)
    first.attach(trainer)  # the same guard again: nothing changes
    assert sum(c is first for c in trainer.callback_handler.callbacks) == 1
    trainer.add_callback(second)  # behind the guard's back: refused when training begins
    with pytest.raises(ValueError, match="already has a SafetyGuardCallback"):
        trainer.train()


def test_a_model_that_does_not_refuse_is_warned_about_at_train_begin(
    tmp_path, text_tokenizer, caplog
):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    never = KeywordJudge(["a refusal phrase this random model never says"])
    guard = _guard(model, text_tokenizer, judge=never)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [guard], steps=1, lr=1e-7)
    with says(caplog, "answers 100.0 % of the first 8 harmful probe prompts"):
        trainer.train()
    said = [r.getMessage() for r in caplog.records if "does not look aligned" in r.getMessage()]
    assert "can never halt on safety" in said[0]


def test_monitor_mode_says_what_the_guard_would_have_done(tmp_path, text_tokenizer, caplog):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    guard = _guard(model, text_tokenizer, max_asr_rise=20, halt=False)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [guard], steps=30, lr=3e-2)
    with (
        caplog.at_level(logging.WARNING, logger="safety_guard"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.state.global_step == 30 and guard.halt_step is None
    summary = guard.summary()
    halts = [r for r in guard.records if r.get("status") == "halt"]
    assert halts and summary["would_halt_step"] == halts[0]["step"]
    assert summary["would_halt_count"] == len(halts) and summary["would_halt_reason"]
    # each halt said once, as a log line (no warning filter hides it), not also as a warning
    said = [r.getMessage() for r in caplog.records if "halt disabled" in r.getMessage()]
    assert len(said) == len(halts)
    assert not [w for w in caught if "halt disabled" in str(w.message)]


def test_a_file_where_the_guard_folder_goes_is_refused_before_training(tmp_path, text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    guard = _guard(model, text_tokenizer)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [guard], steps=1)
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "safety-guard").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="output_dir"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_an_interrupted_landscape_is_refused(tmp_path, text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    land = make_landscape(model)
    land.data["complete"] = False
    judge = echo_judge(model, text_tokenizer, list(load_prompts(PROBE, limit=8)))
    guard = SafetyGuardCallback(land, judge=judge, **OPTIONS)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [guard], steps=1)
    with pytest.raises(LandscapeFileError, match="incomplete"):
        trainer.train()


def test_a_new_run_sets_the_old_runs_files_aside(tmp_path, text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    folder = tmp_path / "out" / "safety-guard"
    append_record(folder / "trajectory.jsonl", {"step": 99, "event": "check"})
    (folder / "last-safe").mkdir()
    (folder / "last-safe" / "safety_guard_step.json").write_text('{"step": 98}')
    trainer = make_trainer(
        model, text_tokenizer, tmp_path, [_guard(model, text_tokenizer)], steps=2, lr=1e-7
    )
    trainer.train()
    assert [r["step"] for r in read_records(folder / "trajectory.jsonl")] == [1, 2]
    assert not (folder / "last-safe").exists()  # (keep_last_safe=False here)
    (old,) = folder.glob("previous-*")
    assert [r["step"] for r in read_records(old / "trajectory.jsonl")] == [99]
    assert (old / "last-safe" / "safety_guard_step.json").read_text() == '{"step": 98}'


def test_a_guard_reused_by_a_second_trainer_logs_to_that_trainer(tmp_path, text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    guard = _guard(model, text_tokenizer, max_asr_rise=50)
    first, second = Recorder(), Recorder()
    for name, recorder in (("first", first), ("second", second)):
        trainer = make_trainer(
            model, text_tokenizer, tmp_path / name, [recorder, guard], steps=2, lr=1e-7
        )
        trainer.train()
    safety = lambda rec: [s for s, e in rec.entries if "safety/displacement" in e]  # noqa: E731
    assert safety(first) == safety(second) == [1, 2]


@pytest.mark.parametrize(
    "tail",
    [b'{"step": 3, "event": "ch', b"\x00\x00\x00\x00", b'{"step": 3}\xff\xfe\n'],
    ids=["half-written", "nul-bytes", "not-utf8"],
)
def test_a_damaged_trajectory_tail_is_cut_back_on_resume(tmp_path, caplog, tail):
    path = tmp_path / "trajectory.jsonl"
    for step in (1, 2):
        append_record(path, {"step": step, "event": "check"})
    with path.open("ab") as fh:
        fh.write(tail)
    with caplog.at_level(logging.WARNING):
        kept = truncate_after(path, 5)
    assert [r["step"] for r in kept] == [1, 2]
    assert any("damaged" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    append_record(path, {"step": 3, "event": "check"})
    assert [r["step"] for r in read_records(path)] == [1, 2, 3]
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize(
    ("option", "error"),
    [
        ({"lookahead": (float("nan"),)}, ValueError),
        ({"nll_tolerance": float("nan")}, ValueError),
        ({"max_asr_rise": float("inf")}, ValueError),
        ({"batch_size": 1.5}, TypeError),
        ({"max_asr_rise": "10"}, TypeError),
        ({"halt": 1}, TypeError),
        ({"num_prompts": "all"}, TypeError),
        ({"harmful": None}, TypeError),
    ],
)
def test_every_setting_is_validated_by_name(option, error):
    (name,) = option
    with pytest.raises(error, match=f"GuardConfig.{name}"):
        GuardConfig(**option)


def test_settings_of_the_right_kind_are_taken(tmp_path):
    config = GuardConfig(lookahead=3, batch_size=8.0, output_dir=tmp_path, num_prompts=None)
    assert config.lookahead == (3.0,) and config.batch_size == 8
    assert config.output_dir == str(tmp_path)


def test_the_guards_files_follow_the_umask(tmp_path, text_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = make_model(vocab_size=len(text_tokenizer), tie=False)
    guard = _guard(base, text_tokenizer, keep_last_safe=True, max_asr_rise=50)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    trainer = make_trainer(model, text_tokenizer, tmp_path, [guard], steps=2, lr=1e-7)
    previous = os.umask(0o027)
    try:
        trainer.train()
        folder = tmp_path / "out" / "safety-guard"
        truncate_after(folder / "trajectory.jsonl", 1)  # a resume rewrites it
    finally:
        os.umask(previous)
    assert guard.last_safe_step is not None
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(folder / "summary.json") == mode(folder / "trajectory.jsonl") == 0o640
    assert mode(folder / "last-safe") == 0o750


def test_a_resumed_full_finetune_refuses_a_wrong_aligned_model(tmp_path, text_tokenizer):
    from transformers import LlamaForCausalLM

    from safety_guard.landscape import LandscapeMismatchError

    base = make_model(vocab_size=len(text_tokenizer), tie=False)
    base.save_pretrained(tmp_path / "base")
    land = make_landscape(base)
    judge = echo_judge(base, text_tokenizer, list(load_prompts(PROBE, limit=8)))

    def run(model, resume=None, **kw):
        guard = SafetyGuardCallback(land, judge=judge, **{**OPTIONS, "max_asr_rise": 50, **kw})
        trainer = make_trainer(
            model,
            text_tokenizer,
            tmp_path,
            [guard],
            steps=4,
            lr=1e-4,
            save_strategy="steps",
            save_steps=2,
        )
        trainer.train(resume_from_checkpoint=resume)
        return guard, trainer

    run(base)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    # resumed with the model loaded from the checkpoint: its name points at finetuned weights
    with pytest.raises(LandscapeMismatchError, match="GuardConfig\\(origin=FOLDER\\)"):
        run(LlamaForCausalLM.from_pretrained(checkpoint), resume=str(checkpoint))
    guard, trainer = run(
        LlamaForCausalLM.from_pretrained(checkpoint),
        resume=str(checkpoint),
        origin=str(tmp_path / "base"),
    )
    assert trainer.state.global_step == 4 and guard.records[-1]["step"] == 4


def test_a_landscape_judged_by_phrases_says_nothing_of_another_judge():
    """The guard trusts a landscape's screen record for the judge that made it only."""
    from conftest import make_model
    from guard_helpers import make_landscape

    from safety_guard.guard import GuardConfig
    from safety_guard.guard.setup import effective_settings

    land = make_landscape(make_model())
    said = []
    config = GuardConfig(judge="harmbench:some/classifier")
    assert effective_settings(config, land, lambda *a: said.append(a[0] % a[1:])) is config
    assert len(said) == 1 and "judged by refusal phrases, not by judge=" in said[0]
    said.clear()
    assert effective_settings(GuardConfig(), land, lambda *a: said.append(a)) == GuardConfig()
    phrases = GuardConfig(judge="my_phrases.txt")  # a phrase file is still a phrase judge
    assert effective_settings(phrases, land, lambda *a: said.append(a)) is phrases
    assert said == []
