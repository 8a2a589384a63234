"""Optional extras: missing packages raise errors that name the extra; the guard runs without them."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from conftest import make_model
from guard_helpers import make_landscape, make_trainer

import safety_guard._extras as extras
from safety_guard import MissingExtraError, SafetyGuardCallback
from safety_guard.measure.judges import CallableJudge


def _block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import module`` fail as if it were not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match=r'pip install "safety-guard\[plots\]"') as info:
        extras.require("matplotlib", "plots", purpose="Plotting")
    assert isinstance(info.value, MissingExtraError)
    assert (info.value.package, info.value.extra) == ("matplotlib", "plots")
    assert str(info.value).startswith("Plotting needs the package 'matplotlib'")


def test_require_keeps_a_broken_install_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str):
        raise ModuleNotFoundError("No module named 'kiwisolver'", name="kiwisolver")

    monkeypatch.setattr(extras.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="kiwisolver") as info:
        extras.require("matplotlib", "plots")
    assert not isinstance(info.value, MissingExtraError)


def test_plots_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safety_guard.plots import plot_landscape, plot_trajectory, require_matplotlib

    _block(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError, match=r"safety-guard\[plots\]"):
        require_matplotlib()
    with pytest.raises(MissingExtraError, match=r"safety-guard\[plots\]"):
        plot_trajectory([{"step": 1, "asr": 0.0}], tmp_path / "t.png")
    with pytest.raises(MissingExtraError, match=r"safety-guard\[plots\]"):
        plot_landscape(tmp_path / "missing.json", tmp_path / "l.png")
    assert not list(tmp_path.iterdir())


def test_cli_plot_without_matplotlib_fails_before_computing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from safety_guard.cli.main import main

    _block(monkeypatch, "matplotlib")
    code = main(
        ["landscape", str(tmp_path / "nope"), "-o", str(tmp_path / "l.json"), "--plot", "x"]
    )
    assert code == 2 and "safety-guard[plots]" in capsys.readouterr().err


def test_testbed_parts_name_their_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safety_guard.models.loading import load_model
    from safety_guard.testbed import load_gguf_model
    from safety_guard.testbed.training import _model_loss_sft_trainer

    _block(monkeypatch, "trl", "gguf")
    with pytest.raises(MissingExtraError, match=r"safety-guard\[testbed\]"):
        _model_loss_sft_trainer()
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(MissingExtraError, match=r"safety-guard\[testbed\]"):
        load_gguf_model(gguf)
    with pytest.raises(MissingExtraError, match=r"safety-guard\[gguf\]"):
        load_model(gguf)


def test_testbed_build_checks_its_extras_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safety_guard.testbed import build, build_testbed

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("the base model was fetched before the extras were checked")

    monkeypatch.setattr(build, "find_gguf", no_download)
    _block(monkeypatch, "trl")
    with pytest.raises(MissingExtraError, match=r"Building the testbed needs.*\[testbed\]"):
        build_testbed(cache_dir=tmp_path, progress=False)


def test_thread_advisor_without_psutil(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from safety_guard.testbed.threads import ThreadAdvisor

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _block(monkeypatch, "psutil")
    with caplog.at_level(logging.WARNING, logger="safety_guard.testbed.threads"):
        advisor = ThreadAdvisor()
    assert not advisor.active
    assert advisor.update(min_interval=0.0) == torch.get_num_threads()
    assert "safety-guard[testbed]" in caplog.text


def test_guarded_training_without_matplotlib_skips_the_plot(
    tmp_path: Path,
    tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`pip install safety-guard` (no extras) is enough for the callback with a landscape file."""
    _block(monkeypatch, "matplotlib", "trl", "gguf")  # psutil comes with accelerate
    model = make_model(vocab_size=len(tokenizer))
    landscape = tmp_path / "landscape.json"
    make_landscape(model).save(landscape)
    guard = SafetyGuardCallback(
        str(landscape), check_every=1, probe_every=2, num_prompts=2, num_benign=2, max_new_tokens=2
    )
    guard.judge = CallableJudge(lambda p, r: [False] * len(r))
    trainer = make_trainer(model, tokenizer, tmp_path, guard, steps=2, learning_rate=1e-5)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    folder = tmp_path / "out" / "safety-guard"
    assert (folder / "trajectory.jsonl").exists() and (folder / "summary.json").exists()
    assert not (folder / "trajectory.png").exists()
    assert "safety-guard[plots]" in caplog.text
