"""The ``landscape`` options are generated from LandscapeConfig/ProbeConfig: one default, one help."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

import pytest

from safety_guard._options import add_dataclass_options, field_default, given_options
from safety_guard.cli.main import INTERPOLATION_GRID, build_parser, landscape_configs
from safety_guard.landscape import LandscapeConfig, format_grid, parse_grid
from safety_guard.measure.probe import PAPER_PROBE, ProbeConfig
from safety_guard.models.parameters import ParameterSelection


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _landscape_help(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["landscape", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _configs(*argv: str) -> tuple[LandscapeConfig, ProbeConfig]:
    return landscape_configs(build_parser().parse_args(["landscape", "-o", "l.json", *argv]))


@pytest.mark.parametrize("cls", [LandscapeConfig, ProbeConfig])
def test_help_shows_each_field_with_its_help_and_default(
    cls: type, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _squash(_landscape_help(capsys, monkeypatch))
    show = {"alphas": format_grid}
    for f in dataclasses.fields(cls):
        if f.name == "selection":  # nested: its `exclude` is --exclude
            continue
        flag = {"kind": "--direction", "alphas": "--grid", "num_harmful": "--num-prompts"}.get(
            f.name, "--" + f.name.replace("_", "-")
        )
        assert _squash(flag) in text, flag
        assert _squash(f.metadata["help"]) in text, f.name
        default = field_default(cls, f.name)
        if default is not None:
            shown = show.get(f.name, str)(default)
            assert _squash(f"{f.metadata['help']} (default: {shown}") in text, f.name
    exclude_help = ParameterSelection.__dataclass_fields__["exclude"].metadata["help"]
    assert _squash(exclude_help) in text


def test_no_options_give_the_dataclass_defaults() -> None:
    landscape, probe = _configs()
    assert landscape.to_dict() == LandscapeConfig().to_dict()
    assert probe.to_dict() == ProbeConfig().to_dict()


def test_established_flags_keep_working() -> None:
    landscape, probe = _configs(
        "--num-prompts",
        "40",
        "--num-directions",
        "5",
        "--grid=-0.2:0.2:5",
        "--seed",
        "3",
        "--harmful",
        "prompts.csv",
        "--prompt-column",
        "goal",
        "--plain-template",
        "--no-system-prompt",
        "--offload",
        "disk",
        "--edge-asr",
        "90",
        "--normalization",
        "filter",
        "--exclude",
        "lm_head",
        "--exclude",
        "embed",
        "--batch-size",
        "8",
        "--num-benign",
        "0",
        "--max-new-tokens",
        "12",
    )
    assert (landscape.num_directions, landscape.seed, landscape.edge_asr) == (5, 3, 90.0)
    assert landscape.alphas == parse_grid("-0.2:0.2:5") and landscape.search == "adaptive"
    assert (landscape.offload, landscape.normalization) == ("disk", "filter")
    assert landscape.selection.exclude == ("lm_head", "embed")
    assert (probe.num_harmful, probe.harmful, probe.prompt_column) == (40, "prompts.csv", "goal")
    assert (probe.template, probe.system_prompt) == ("plain", "")
    assert (probe.batch_size, probe.num_benign, probe.max_new_tokens) == (8, 0, 12)
    _, probe = _configs("--system-prompt", "Be safe.", "--num-harmful", "none")
    assert probe.system_prompt == "Be safe." and probe.num_harmful is None
    with pytest.raises(SystemExit):
        _configs("--system-prompt", "x", "--no-system-prompt")


def test_context_dependent_defaults() -> None:
    landscape, probe = _configs("--paper")
    assert landscape.search == "grid"
    assert (probe.max_new_tokens, probe.early_stop) == (
        PAPER_PROBE.max_new_tokens,
        PAPER_PROBE.early_stop,
    )
    _, probe = _configs("--paper", "--max-new-tokens", "64", "--early-stop")
    assert (probe.max_new_tokens, probe.early_stop) == (64, True)
    landscape, _ = _configs("--direction", "interpolation", "--target", "ft")
    assert landscape.kind == "interpolation" and landscape.search == "grid"
    assert landscape.alphas == parse_grid(INTERPOLATION_GRID)
    landscape, _ = _configs("--dims", "2", "--grid=-0.5:0.5:11")
    assert landscape.search == "grid" and landscape.betas == landscape.alphas
    landscape, _ = _configs("--kind", "interpolation", "--alphas=-1,0,1", "--search", "grid")
    assert landscape.alphas == (-1.0, 0.0, 1.0)


def test_helper_types_and_errors() -> None:
    @dataclass
    class Config:
        rate: float = field(default=0.5, metadata={"help": "A 50 % rate."})
        count: int | None = field(default=None, metadata={"help": "How many."})
        flag: bool = field(default=False, metadata={"help": "A flag."})

    parser = argparse.ArgumentParser()
    add_dataclass_options(parser, Config, prefix="c.")
    help_text = parser.format_help()
    assert "A 50 % rate. (default: 0.5)" in help_text  # '%' escaped for argparse
    args = parser.parse_args(["--count", "none", "--flag", "--rate", "2"])
    assert given_options(args, Config, prefix="c.") == {"count": None, "flag": True, "rate": 2.0}
    assert given_options(parser.parse_args(["--count", "3"]), Config, prefix="c.") == {"count": 3}

    @dataclass
    class Nested:
        inner: ParameterSelection = field(default_factory=ParameterSelection)

    with pytest.raises(TypeError, match="parse="):
        add_dataclass_options(argparse.ArgumentParser(), Nested, prefix="n.")
    with pytest.raises(ValueError, match="no field"):
        field_default(Config, "missing")


def test_format_grid_round_trips() -> None:
    for spec in ("-0.5:0.5:21", "-0.5:1.5:21", "-0.1,0,0.3", "0,0.1"):
        grid = parse_grid(spec)
        assert parse_grid(format_grid(grid)) == grid
    assert format_grid(parse_grid("-0.5:0.5:21")) == "-0.5:0.5:21"
