"""The command line on a tiny model saved to a folder."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from safety_guard.landscape import Landscape


def test_landscape_visage_plot_roundtrip(tmp_path, model_dir, capsys):
    out = tmp_path / "land.json"
    code, stdout, stderr = run_cli(
        capsys,
        "landscape",
        model_dir,
        "--output",
        out,
        "--num-directions",
        "1",
        "--grid=-0.2,0,0.2",
        "--search",
        "grid",
        "--num-prompts",
        "4",
        "--num-benign",
        "2",
        "--max-new-tokens",
        "4",
        "--quiet",
        "--system-prompt",
        "Be safe.",
    )
    assert code == 0, stderr
    assert "VISAGE" in stdout and out.exists()
    assert "prompts: 4 harmful (builtin:harmful:heldout[:4]), 2 benign" in stdout
    land = Landscape.load(out)
    assert land.complete and land.data["probe"]["config"]["system_prompt"] == "Be safe."
    code, stdout, _ = run_cli(capsys, "visage", out, "--json")
    payload = json.loads(stdout)
    assert code == 0 and payload["visage"] == pytest.approx(land.visage()["mean"])
    code, stdout, _ = run_cli(capsys, "visage", out)
    assert float(stdout.strip()) == pytest.approx(land.visage()["mean"], abs=0.01)
    png = tmp_path / "land.png"
    code, _, _ = run_cli(capsys, "plot", out, "--output", png)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_clear_errors_and_exit_code(tmp_path, model_dir, capsys):
    code, _, err = run_cli(capsys, "landscape", tmp_path / "nope", "--output", tmp_path / "x.json")
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "visage", tmp_path / "missing.json")
    assert code == 2 and "does not exist" in err
    with pytest.raises(SystemExit) as exit_info:  # a usage error, reported by argparse
        run_cli(capsys, "landscape", model_dir, "--output", tmp_path / "x.json", "--grid=-0.1,0.1")
    assert exit_info.value.code == 2 and "contain 0" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("goal\n")
    code, _, err = run_cli(
        capsys,
        "landscape",
        model_dir,
        "--output",
        tmp_path / "x.json",
        "--harmful",
        empty,
        "--quiet",
    )
    assert code == 2 and "no non-empty prompts" in err
    assert not (tmp_path / "x.json").exists()  # nothing half-written


def test_model_without_chat_template(tmp_path, model_dir, capsys):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "l.json"
    code, _, err = run_cli(
        capsys, "landscape", model_dir, "--output", out, "--quiet", "--num-prompts", "2"
    )
    assert code == 2 and "--plain-template" in err and not out.exists()
    code, _, err = run_cli(
        capsys,
        "landscape",
        model_dir,
        "--output",
        out,
        "--quiet",
        "--num-prompts",
        "2",
        "--num-benign",
        "0",
        "--plain-template",
        "--grid=-0.1,0,0.1",
        "--num-directions",
        "1",
        "--max-new-tokens",
        "2",
    )
    assert code == 0, err
