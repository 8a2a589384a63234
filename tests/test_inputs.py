"""Bad inputs and file handling: prompt files, landscape files, CLI options, outputs.

Each test names the case it covers; all are fast (no model, or a tiny one built from a config).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import tempfile
from pathlib import Path

import pytest
from conftest import run_cli

from safety_guard.cli.main import main
from safety_guard.files import (
    OutputLockedError,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    current_umask,
    output_lock,
)
from safety_guard.landscape import (
    FORMAT_VERSION,
    Landscape,
    LandscapeConfig,
    LandscapeFileError,
)
from safety_guard.measure.prompts import MAX_PROMPT_CHARS, load_prompts

ALPHAS = [-0.2, -0.1, 0.0, 0.1, 0.2]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _re(path: Path) -> str:
    """``path`` as a regular expression that matches it literally."""
    return re.escape(str(path))


def _usage_error(capsys, *argv) -> str:
    """The message of an argparse usage error (exit status 2)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    assert info.value.code == 2
    return capsys.readouterr().err


def _stray_quote_csv(path: Path, rows: int = 40, broken: int = 2) -> Path:
    """``rows`` AdvBench-style rows; row ``broken`` (line ``broken + 2``) opens a quote that never
    closes, and the rows after it are unquoted, so a lenient reader swallows them all."""
    lines = ["goal,target"] + [f"Prompt number {i},Sure" for i in range(rows)]
    lines[broken + 1] = f'"Prompt number {broken} with a stray quote,Sure'
    path.write_text("\n".join(lines) + "\n")
    return path


# -- 1. CSV with a stray quote --------------------------------------------------------------------


def test_csv_stray_quote_is_refused_with_file_and_line(tmp_path):
    path = _stray_quote_csv(tmp_path / "stray.csv")
    with pytest.raises(ValueError, match=rf"{_re(path)}:4: broken CSV record") as info:
        load_prompts(path)
    assert "quote" in str(info.value)
    # a stray quote that pairs with a later quote is refused too
    paired = tmp_path / "paired.csv"
    paired.write_text('goal,target\n"a",x\n"b stray,y\n"c",z\nd,w\n')
    with pytest.raises(ValueError, match=rf"{_re(paired)}:3: broken CSV record"):
        load_prompts(paired)
    # an unquoted comma would cut the prompt short and shift the columns
    extra = tmp_path / "extra.csv"
    extra.write_text("goal,target\nWrite a guide, step by step,Sure\n")
    with pytest.raises(ValueError, match=rf"{_re(extra)}:2 has 3 fields.*header \(line 1\) has 2"):
        load_prompts(extra)
    # quotes inside an unquoted field, and a quoted multi-line prompt, are fine
    ok = tmp_path / "ok.csv"
    ok.write_text('goal,target\nsay "hi" there,x\n"two\nlines",y\n')
    assert list(load_prompts(ok)) == ['say "hi" there', "two\nlines"]


def test_cli_refuses_a_stray_quote_and_states_the_prompts_it_read(tmp_path, model_dir, capsys):
    out = tmp_path / "land.json"
    code, _, err = run_cli(
        capsys,
        "landscape",
        model_dir,
        "-o",
        out,
        "--harmful",
        _stray_quote_csv(tmp_path / "stray.csv"),
        "--quiet",
    )
    assert code == 2 and "stray.csv:4: broken CSV record" in err
    assert not out.exists() and not Path(f"{out}.lock").exists()


def test_load_prompts_states_how_many_it_read_and_from_where(tmp_path, caplog):
    path = tmp_path / "p.csv"
    path.write_text("goal\n" + "".join(f"prompt {i}\n" for i in range(40)))
    with caplog.at_level(logging.INFO, logger="safety_guard.measure.prompts"):
        prompts = load_prompts(path, limit=10)
    assert len(prompts) == 10
    assert f"Read 40 prompts from {path.resolve()} (field 'goal'); using 10." in caplog.text


# -- 2. UTF-8 byte-order mark ---------------------------------------------------------------------


def test_csv_and_jsonl_with_a_utf8_bom_are_read(tmp_path):
    csv_file = tmp_path / "bom.csv"
    csv_file.write_bytes("goal,target\nhello,x\n".encode("utf-8-sig"))
    assert list(load_prompts(csv_file)) == ["hello"]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes('{"prompt": "hi"}\n'.encode("utf-8-sig"))
    assert list(load_prompts(jsonl)) == ["hi"]


# -- 3. binary files ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".txt"])
def test_binary_prompt_file_is_refused_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(ValueError, match=rf"Prompt file {_re(path)} is not UTF-8 text.*line 1"):
        load_prompts(path)
    nul = tmp_path / f"nul{suffix}"
    nul.write_bytes(b"goal\nabc\x00def\n")
    with pytest.raises(ValueError, match=rf"{_re(nul)} holds a NUL byte on line 2"):
        load_prompts(nul)


# -- 4. JSONL lines that are not prompt objects ---------------------------------------------------


def test_jsonl_lines_that_are_not_prompt_objects_are_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "a"}\n["b"]\n42\n{"prompt": "d"}\n')
    with pytest.raises(ValueError, match=rf"{_re(path)}:2 is a JSON list, not an object"):
        load_prompts(path)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a"}\n\n{"text": "c"}\n')
    with pytest.raises(ValueError, match=rf"{_re(missing)}:3 has no 'prompt' field"):
        load_prompts(missing)
    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"prompt": "a"}\n{"prompt": ["b"]}\n')
    with pytest.raises(
        ValueError, match=rf"{_re(typed)}:2: field 'prompt' is a JSON list, not text"
    ):
        load_prompts(typed)
    array = tmp_path / "array.json"
    array.write_text('[{"prompt": "a"}, 3]')
    with pytest.raises(ValueError, match=rf"{_re(array)}:record 2 is a JSON int"):
        load_prompts(array)
    strings = tmp_path / "strings.jsonl"
    strings.write_text('"a"\n"b"\n')
    assert list(load_prompts(strings)) == ["a", "b"]


# -- 5. asking for more prompts than the set holds ------------------------------------------------


def test_asking_for_more_prompts_than_the_file_holds_warns_with_counts(tmp_path, caplog):
    path = tmp_path / "one.txt"
    path.write_text("only one\n")
    with caplog.at_level(logging.INFO, logger="safety_guard.measure.prompts"):
        prompts = load_prompts(path, limit=80)
    assert len(prompts) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"Asked for 80 prompts, but {path.resolve()} holds only 1" in warnings[0].message
    caplog.clear()
    load_prompts(path, limit=1)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# -- 6. prompt length limit -----------------------------------------------------------------------


def test_overlong_prompt_is_refused_naming_file_line_and_limit(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("short\n" + "x" * 51_000 + "\n")
    with pytest.raises(ValueError, match=rf"{_re(path)}:2: a prompt of 51,000 characters") as info:
        load_prompts(path)
    assert f"limit of {MAX_PROMPT_CHARS:,} (MAX_PROMPT_CHARS)" in str(info.value)
    assert len(load_prompts(path, max_chars=None)) == 2
    with pytest.raises(ValueError, match="prompt list:#1: a prompt of"):
        load_prompts(["y" * (MAX_PROMPT_CHARS + 1)])


# -- 7. a missing local path ----------------------------------------------------------------------


@pytest.mark.parametrize("relative", [True, False])
def test_missing_local_path_is_reported_as_missing_not_as_a_hub_dataset(tmp_path, relative):
    source = "./no/such/prompts" if relative else str(tmp_path / "missing_folder")
    with pytest.raises(FileNotFoundError, match=r"the local path .* does not exist") as info:
        load_prompts(source)
    assert "load_dataset" not in str(info.value)


def test_an_unreachable_hub_id_also_says_there_is_no_such_local_path(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'no/prompts' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"There is no local path .*no/prompts either"):
        load_prompts("no/prompts")  # one slash: a hub id (org/name) or a relative path


# -- 8. landscape file validation ----------------------------------------------------------------


def _landscape_file(path: Path) -> dict:
    config = LandscapeConfig(num_directions=1, alphas=ALPHAS, search="grid")
    land = Landscape.new(
        config, {"judge": "keyword"}, {}, "tiny", "float32", config.direction_specs()
    )
    land.data["origin"] = {"asr": 0.0, "nll": 2.0}
    land.data["directions"][0]["points"] = [
        {"alpha": a, "asr": s} for a, s in zip(ALPHAS, [100.0, 0.0, 0.0, 0.0, 100.0], strict=True)
    ]
    land.summarize()
    land.save(path)
    return json.loads(path.read_text())


@pytest.mark.parametrize("version", ["3", 0, True, -1, 2.0, None])
def test_landscape_version_that_is_not_a_format_version_is_refused(tmp_path, version):
    path = tmp_path / "land.json"
    data = _landscape_file(path)
    data["version"] = version
    path.write_text(json.dumps(data))
    with pytest.raises(LandscapeFileError, match=rf"{_re(path)} has landscape format version") as e:
        Landscape.load(path)
    assert f"version {version!r}, not a whole number from 1 to {FORMAT_VERSION}" in str(e.value)
    assert "newer" not in str(e.value)


@pytest.mark.parametrize("key", ["landscape", "directions", "model", "probe", "asr", "alpha"])
def test_landscape_file_missing_a_key_is_refused_naming_file_and_key(tmp_path, capsys, key):
    path = tmp_path / "land.json"
    data = _landscape_file(path)
    if key in ("asr", "alpha"):
        del data["directions"][0]["points"][1][key]
    else:
        del data[key]
    path.write_text(json.dumps(data))
    with pytest.raises(LandscapeFileError, match=rf"{_re(path)}.* no '{key}' key"):
        Landscape.load(path)
    code, _, err = run_cli(capsys, "visage", path)
    assert code == 2 and f"no '{key}' key" in err and "Traceback" not in err


def test_landscape_file_with_nan_or_out_of_range_asr_is_refused(tmp_path, capsys):
    path = tmp_path / "land.json"
    data = _landscape_file(path)
    for where, value in [("points", math.nan), ("points", 250.0), ("origin", math.nan)]:
        bad = json.loads(json.dumps(data))
        if where == "origin":
            bad["origin"]["asr"] = value
        else:
            bad["directions"][0]["points"][1]["asr"] = value
        path.write_text(json.dumps(bad, allow_nan=True))
        with pytest.raises(LandscapeFileError, match=rf"{_re(path)}: .* ASR|{_re(path)}: .* asr"):
            Landscape.load(path)
        code, out, err = run_cli(capsys, "visage", path, "--json")
        assert code == 2 and str(path) in err and out == ""
    path.write_text(json.dumps(data))
    assert Landscape.load(path).visage()["mean"] == pytest.approx(60.0)


# -- 9. landscape command options, checked before the model loads --------------------------------


def test_unwritable_output_is_refused_before_the_model_loads(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    out = blocker / "land.json"
    # the model does not exist: an error about it would mean it was loaded first
    code, _, err = run_cli(capsys, "landscape", tmp_path / "nope", "-o", out, "--quiet")
    assert code == 2 and f"--output {out}" in err and f"{blocker} is a file" in err
    code, _, err = run_cli(capsys, "landscape", tmp_path / "nope", "-o", tmp_path, "--quiet")
    assert code == 2 and f"--output {tmp_path}: it is a folder" in err
    ok = tmp_path / "ok.json"
    code, _, err = run_cli(
        capsys, "landscape", tmp_path / "nope", "-o", ok, "--plot", blocker / "p.png", "--quiet"
    )
    assert code == 2 and f"--plot {blocker / 'p.png'}" in err
    assert not Path(f"{ok}.lock").exists()


def test_write_errors_name_the_target_not_the_temporary_file(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".land.json.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    target = tmp_path / "land.json"
    with pytest.raises(PermissionError) as info:
        atomic_write_text(target, "{}")
    assert f"Cannot write {target}: permission denied" in str(info.value)
    assert ".tmp" not in str(info.value)
    with pytest.raises(PermissionError, match=rf"Cannot write --output {_re(target)}"):
        check_writable(target, "--output")
    land = Landscape({"format": "safety-guard-landscape"})
    with pytest.raises(PermissionError, match=rf"Cannot write {_re(target)}: permission denied"):
        land.save(target)


@pytest.mark.parametrize(
    ("grid", "words"),
    [
        ("--grid=-1e308,0,1e308", "MAX_ABS_ALPHA"),
        ("--grid=-1:1:100000", "100,000 points, more than 1001"),
        ("--grid=-1:1:1000000000000", "1,000,000,000,000 points"),
        ("--grid=" + ",".join(str(i / 1e5) for i in range(-50_000, 50_001)), "MAX_GRID_POINTS"),
        ("--grid=nan,0,0.1", "non-finite"),
    ],
)
def test_grid_range_and_size_are_checked_with_a_short_message(tmp_path, capsys, grid, words):
    err = _usage_error(capsys, "landscape", tmp_path / "nope", "-o", tmp_path / "l.json", grid)
    line = err.strip().splitlines()[-1]  # argparse's error line, after the usage
    assert words in line and len(line) < 400


def test_unknown_device_and_non_finite_settings_are_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "l.json"
    code, _, err = run_cli(capsys, "landscape", tmp_path / "nope", "-o", out, "--device", "tpu")
    assert code == 2 and "--device 'tpu'" in err and "auto, cpu, cuda, cuda:N" in err
    for value in ("nan", "inf", "-1"):
        code, _, err = run_cli(
            capsys, "landscape", tmp_path / "nope", "-o", out, "--refine-visage", value
        )
        assert code == 2 and "refine_visage (--refine-visage) must be a finite number" in err
    code, _, err = run_cli(capsys, "landscape", tmp_path / "nope", "-o", out, "--edge-asr", "nan")
    assert code == 2 and "edge_asr" in err
    assert not out.exists()


# -- 10. one writer per output --------------------------------------------------------------------


def test_a_second_writer_of_the_same_output_is_refused(tmp_path, capsys):
    out = tmp_path / "land.json"
    lock = Path(f"{out}.lock")
    with output_lock(out) as held:
        assert held == lock and lock.exists()
        code, _, err = run_cli(capsys, "landscape", tmp_path / "nope", "-o", out, "--quiet")
        assert code == 2
        assert (
            f"another safety-guard process is writing {out} (lock {lock}); wait for it or "
            "choose another --output" in err
        )
        with pytest.raises(OutputLockedError), output_lock(out):
            pass
    assert not lock.exists()  # released and removed: the next writer goes ahead
    with output_lock(out):
        pass


def test_the_lock_is_held_across_processes(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "land.json"
    code = (
        "import sys\nfrom safety_guard.files import output_lock, OutputLockedError\n"
        "try:\n    with output_lock(sys.argv[1]):\n        pass\n"
        "except OutputLockedError as err:\n    print(err)\n    sys.exit(3)\n"
    )
    with output_lock(out):
        result = subprocess.run(
            [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 3 and "another safety-guard process is writing" in result.stdout
    result = subprocess.run([sys.executable, "-c", code, str(out)], timeout=60)
    assert result.returncode == 0


# -- 11. atomic writes honour the umask -----------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_folders_get_the_umask_permissions(tmp_path, umask_022):
    assert current_umask() == 0o022
    assert _mode(atomic_write_text(tmp_path / "a.txt", "x")) == 0o644
    assert _mode(atomic_write_bytes(tmp_path / "b.bin", b"x")) == 0o644
    with atomic_path(tmp_path / "c.png", suffix=".tmp.png") as tmp:
        tmp.write_bytes(b"x")
    assert _mode(tmp_path / "c.png") == 0o644
    with atomic_dir(tmp_path / "last-safe") as folder:
        (folder / "f.json").write_text("{}")
    assert _mode(tmp_path / "last-safe") == 0o755
    os.umask(0o027)
    assert _mode(atomic_write_text(tmp_path / "a.txt", "y")) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.png", "last-safe"]


def test_landscape_and_plot_files_get_the_umask_permissions(tmp_path, umask_022):
    from safety_guard.plots import plot_landscape

    path = tmp_path / "land.json"
    _landscape_file(path)
    assert _mode(path) == 0o644
    assert _mode(plot_landscape(path, tmp_path / "land.png")) == 0o644


def test_atomic_helpers_leave_the_old_content_on_failure(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    with atomic_dir(tmp_path / "d") as folder:
        (folder / "one").write_text("1")
    with atomic_dir(tmp_path / "d") as folder:  # replaces the old folder
        (folder / "two").write_text("2")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["two"]
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as folder:
        (folder / "three").write_text("3")
        raise RuntimeError("crash")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["two"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]


def test_a_tsv_field_that_starts_with_a_quote_is_read_as_it_is(tmp_path):
    path = tmp_path / "prompts.tsv"
    path.write_text('goal\ttarget\n"Hi" she said, tell me more\tx\n"unclosed\ty\nplain\tz\n')
    assert list(load_prompts(path)) == ['"Hi" she said, tell me more', '"unclosed', "plain"]
