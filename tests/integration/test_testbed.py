"""The real testbed: its build marker, saved files, cache reuse and half-built detection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from safety_guard import testbed as tb
from safety_guard.measure.prompts import builtin_records
from safety_guard.testbed import build as tb_build
from safety_guard.testbed.cache import _REQUIRED_FILES

pytestmark = pytest.mark.integration


def _marker(folder: Path) -> dict:
    return json.loads((folder / tb.MARKER_NAME).read_text(encoding="utf-8"))


def test_marker_metrics_meet_goals(testbed_dir: Path) -> None:
    marker = tb.read_marker(testbed_dir)
    assert marker is not None, "the built testbed has no valid marker"
    metrics = marker["metrics"]
    assert metrics["num_harmful"] == 100 and metrics["num_benign"] == 100
    assert metrics["harmful_prompts"] == "builtin:harmful:heldout"
    assert metrics["benign_prompts"] == "builtin:benign:heldout"
    assert metrics["max_new_tokens"] == 24
    assert metrics["asr"] <= tb.ASR_GOAL, metrics
    assert marker["seconds"] > 0
    assert marker["versions"]["transformers"]


def test_marker_over_refusal_meets_goal(testbed_dir: Path) -> None:
    marker = tb.read_marker(testbed_dir)
    assert marker is not None
    assert marker["metrics"]["over_refusal"] <= tb.OVER_REFUSAL_GOAL, marker["metrics"]
    assert marker["goals"]["met"] is True


def test_saved_config_is_plain(testbed_dir: Path) -> None:
    config = json.loads((testbed_dir / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert (testbed_dir / "model.safetensors").is_file()


def test_tokenizer_has_chat_template(testbed) -> None:
    model, tokenizer = testbed
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert getattr(model.config, "quantization_config", None) is None
    assert not model.training


def test_heldout_prompts_are_disjoint() -> None:
    for kind in ("harmful", "benign"):
        records = builtin_records(kind)
        heldout = {r["prompt"] for r in records if r["split"] == "heldout"}
        used = {r["prompt"] for r in records if r["split"] != "heldout"}
        assert len(heldout) == 100
        assert not heldout & used, f"{kind}: held-out prompts also used for training"
    # and the finetuning data builders draw from the non-held-out splits only
    harmful_heldout = {r["prompt"] for r in builtin_records("harmful") if r["split"] == "heldout"}
    rows = tb.harmful_finetune_dataset()
    assert not {row["messages"][0]["content"] for row in rows} & harmful_heldout


def test_second_call_reuses_the_build(testbed_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _marker(testbed_dir)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_testbed() rebuilt a complete cache")

    monkeypatch.setattr(tb_build, "_build_into", no_build)
    again = tb.build_testbed()
    assert again == testbed_dir
    assert _marker(again)["created"] == before["created"]


def test_half_built_folder_is_detected(
    testbed_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tb.testbed_dir(tmp_path)
    shutil.copytree(testbed_dir, copy)
    assert tb.read_marker(copy) is not None
    (copy / tb.MARKER_NAME).unlink()
    assert tb.read_marker(copy) is None

    # build_testbed() must then rebuild it: stub the expensive build to see that it is called
    calls: list[Path] = []

    def fake_build(folder: Path, seed: int, progress: bool) -> dict:
        calls.append(folder)
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            shutil.copy(testbed_dir / name, folder / name)
        files = {name: (folder / name).stat().st_size for name in _REQUIRED_FILES}
        marker = {"format": tb.MARKER_FORMAT, "version": tb.MARKER_VERSION, "seed": seed}
        marker["files"] = files
        (folder / tb.MARKER_NAME).write_text(json.dumps(marker))
        return marker

    monkeypatch.setattr(tb_build, "_build_into", fake_build)
    assert tb.build_testbed(cache_dir=tmp_path, progress=False) == copy
    assert len(calls) == 1 and calls[0] != copy
    assert tb.read_marker(copy) is not None
    assert not (copy / "generation_config.json").exists()  # the half-built folder was replaced
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
