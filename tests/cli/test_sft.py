"""``safety-guard sft``: TRL's SFT entry point with the guard attached, offline on a tiny model
and a local JSONL dataset."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import make_model, run_cli
from guard_helpers import make_landscape

pytest.importorskip("trl")

from safety_guard.cli.sft import (
    RENAMED,
    guard_arguments,
    guard_config,
    make_parser,
    trl_dataclasses,
)
from safety_guard.guard import GuardConfig


def test_guard_options_do_not_clash_with_trl_and_map_back_to_guard_config():
    trl_names = {f.name for d in trl_dataclasses() for f in dataclasses.fields(d)}
    guard_names = {f.name for f in dataclasses.fields(guard_arguments())}
    assert guard_names & trl_names == set()
    assert {f.name for f in dataclasses.fields(GuardConfig)} - guard_names == set(RENAMED)
    args = guard_arguments()(max_asr_rise=5.0, lookahead=[3.0], guard_output_dir="g")
    landscape, config = guard_config(args)
    assert landscape is None
    assert config == GuardConfig(max_asr_rise=5.0, lookahead=(3.0,), output_dir="g")


def test_help_lists_trl_and_guard_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "sft", "--help")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model_name_or_path", "--dataset_name", "--use_peft", "--learning_rate"):
        assert option in out  # TRL's
    for option in ("--landscape", "--max_asr_rise", "--judge", "--guard_output_dir"):
        assert option in out  # the guard's
    assert "safety-guard (the guard's options" in out


def test_a_yaml_config_sets_guard_options_too(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("model_name_or_path: m\nmax_asr_rise: 5\nsignal: generate\nlookahead: [3]\n")
    parsed = make_parser().parse_args_and_config(
        ["--config", str(config), "--output_dir", "o", "--use_cpu"]
    )
    _, guard = guard_config(parsed[-1])
    assert (guard.max_asr_rise, guard.signal, guard.lookahead) == (5.0, "generate", (3.0,))
    assert parsed[2].model_name_or_path == "m"


@pytest.fixture
def sft_inputs(tmp_path, text_tokenizer):
    """A tiny chat model folder, its landscape file and a local JSONL dataset folder."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    make_model(vocab_size=len(text_tokenizer), tie=False).save_pretrained(folder)
    text_tokenizer.save_pretrained(folder)
    land = make_landscape(AutoModelForCausalLM.from_pretrained(folder))
    land.save(tmp_path / "landscape.json")
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Tell me about {t}."},
                {"role": "assistant", "content": f"The {t} is a fine thing to learn."},
            ]
        }
        for t in ("garden", "river", "kitchen", "museum", "bicycle", "forest", "island", "camera")
    ]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder, tmp_path / "landscape.json", data


def _sft(capsys, tmp_path, inputs, *extra):
    folder, landscape, data = inputs
    return run_cli(
        capsys,
        "sft",
        "--model_name_or_path",
        folder,
        "--dataset_name",
        data,
        "--output_dir",
        tmp_path / "out",
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--max_length",
        "64",
        "--dtype",
        "float32",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--landscape",
        landscape,
        "--harmful",
        "builtin:harmful:probe",
        "--num_prompts",
        "8",
        "--num_benign",
        "2",
        "--max_new_tokens",
        "6",
        "--keep_last_safe",
        "false",
        "--confidence_z",
        "0",
        "--nll_tolerance",
        "1e9",
        *extra,
    )


def test_a_tiny_offline_sft_run_finishes_with_the_guards_summary(tmp_path, capsys, sft_inputs):
    code, out, err = _sft(capsys, tmp_path, sft_inputs)
    assert code == 0, err
    assert "safety-guard: no halt (" in out, out
    summary = json.loads((tmp_path / "out" / "safety-guard" / "summary.json").read_text())
    assert summary["halt_step"] is None and summary["probes"] >= 1
    assert (tmp_path / "out" / "model.safetensors").exists()  # saved as trl sft saves


def test_a_nan_injected_into_the_weights_halts_the_sft_run(
    tmp_path, capsys, sft_inputs, monkeypatch
):
    from transformers import Trainer

    step = Trainer.training_step

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = step(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 2:  # step 3 updates a NaN weight
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(Trainer, "training_step", poisoned)
    code, out, err = _sft(capsys, tmp_path, sft_inputs, "--guard_output_dir", tmp_path / "g")
    assert code == 0, err
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    halt = summary["halt_step"]
    assert halt in (3, 4), out  # the first check that sees the NaN weight (or its NaN loss)
    assert f"safety-guard: halted at step {halt}; last safe step" in out and "not finite" in out
    records = (tmp_path / "g" / "trajectory.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["step"] == halt < 6  # training stopped there
