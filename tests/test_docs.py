"""The documentation works: every code block of README.md and docs/ is run or checked against the
code, and every relative link resolves.

A Python block is import-checked (each name it imports exists; each call of a safety-guard class,
function or method binds to its signature, keyword overrides of the guard included; each
attribute read off a safety-guard object exists) and, where it can run offline, run on a tiny
model. A shell block's commands are parsed by the real parsers (``safety-guard``, the examples'
and benchmarks' options, the package's extras). A YAML block loads.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import inspect
import io
import re
import shlex
from importlib.metadata import metadata
from pathlib import Path

import pytest
import yaml

from safety_guard import GuardConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def blocks(language: str) -> list[tuple[str, str]]:
    """``(id, code)`` of every fenced block in ``language`` in the documentation."""
    found = []
    for path in DOCS:
        for n, match in enumerate(FENCE.finditer(path.read_text())):
            if match.group(1) == language:
                found.append((f"{path.relative_to(ROOT)}#{n}", match.group(2)))
    return found


def block(doc: str, contains: str) -> str:
    """The one Python block of ``doc`` that contains ``contains``."""
    found = [code for name, code in blocks("python") if name.startswith(doc) and contains in code]
    assert len(found) == 1, f"{doc}: {len(found)} Python blocks contain {contains!r}"
    return found[0]


def test_every_block_has_a_checked_language():
    languages = {m.group(1) for path in DOCS for m in FENCE.finditer(path.read_text())}
    assert languages <= {"python", "bash", "yaml"}, languages


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as GitHub makes them."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = FENCE.sub("", path.read_text())
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    missing = []
    for target in targets:
        file, _, anchor = target.partition("#")
        linked = path.parent / file if file else path
        if not linked.exists() or (
            anchor and linked.suffix == ".md" and anchor not in anchors(linked)
        ):
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)}: links to missing {missing}"


def test_the_link_check_reads_anchors():
    assert "the-offline-testbed" in anchors(ROOT / "docs" / "testbed.md")
    assert "landscape_costpy--what-a-safety-landscape-costs" in anchors(
        ROOT / "benchmarks" / "README.md"
    )


# -- Python blocks: imports, signatures, attributes ------------------------------------------------


def _returned(func, owner=None):
    """The class ``func`` returns, from its annotation (None when unknown)."""
    annotation = inspect.signature(func).return_annotation
    if isinstance(annotation, str):
        if owner is not None and annotation in (owner.__name__, "Self"):
            return owner
        module = importlib.import_module(func.__module__)
        annotation = getattr(module, annotation.split("|")[0].strip(), None)
    return annotation if inspect.isclass(annotation) else None


def _has(cls, name: str) -> bool:
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return hasattr(cls, name) or name in fields


def _check_call(func, call: ast.Call, where: str, owner=None) -> None:
    """``call`` binds to ``func``'s signature; a guard's extra keywords are GuardConfig fields."""
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    if owner is not None and params and params[0].name in ("self", "cls"):
        params = params[1:]
        signature = signature.replace(parameters=params)
    keywords = [k.arg for k in call.keywords if k.arg is not None]
    try:
        bound = signature.bind_partial(*call.args, **{k: None for k in keywords})
    except TypeError as err:
        raise AssertionError(f"{where}: {ast.unparse(call)}: {err}") from err
    extra = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
    if extra is not None and extra in bound.arguments:
        unknown = set(bound.arguments[extra]) - {f.name for f in dataclasses.fields(GuardConfig)}
        assert not unknown, f"{where}: {ast.unparse(call)}: no GuardConfig field {unknown}"


def check_python(code: str, where: str) -> int:
    """Import-check one Python block; returns how many safety-guard names it checked."""
    tree = ast.parse(code)
    names: dict[str, object] = {}  # names bound to safety-guard objects (classes, functions)
    types: dict[str, type] = {}  # variables holding instances of safety-guard classes
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
                if node.module.split(".")[0] == "safety_guard":
                    names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
    for node in ast.walk(tree):  # assignments first, so that method calls know their receiver
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            cls = _call_result(node.value, names, types)
            targets = node.targets[0]
            if isinstance(targets, ast.Tuple):
                continue  # load_model's (model, tokenizer)
            if cls is not None and isinstance(targets, ast.Name):
                types[targets.id] = cls
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in names:
                _check_call(names[func.id], node, where)
                checked += 1
            elif isinstance(func, ast.Attribute):
                owner = _receiver(func.value, names, types)
                if owner is not None:
                    assert _has(owner, func.attr), f"{where}: {owner.__name__} has no {func.attr}"
                    _check_call(getattr(owner, func.attr), node, where, owner)
                    checked += 1
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            owner = _receiver(node.value, names, types)
            if owner is not None:
                assert _has(owner, node.attr), f"{where}: {owner.__name__} has no {node.attr}"
                checked += 1
    return checked


def _receiver(value: ast.expr, names: dict, types: dict):
    """The safety-guard class ``value`` is (a class name) or holds (a variable), else None."""
    if isinstance(value, ast.Name):
        if value.id in types:
            return types[value.id]
        if inspect.isclass(names.get(value.id)):
            return names[value.id]
    if isinstance(value, ast.Call):
        return _call_result(value, names, types)
    return None


def _call_result(call: ast.Call, names: dict, types: dict):
    func = call.func
    if isinstance(func, ast.Name) and func.id in names:
        obj = names[func.id]
        return obj if inspect.isclass(obj) else _returned(obj)
    if isinstance(func, ast.Attribute):
        owner = _receiver(func.value, names, types)
        if owner is not None and hasattr(owner, func.attr):
            return _returned(getattr(owner, func.attr), owner)
    return None


@pytest.mark.parametrize(("where", "code"), blocks("python"), ids=[b[0] for b in blocks("python")])
def test_python_blocks_import_and_bind(where, code):
    assert check_python(code, where) > 0, f"{where}: no safety-guard name to check"


def test_the_import_check_catches_a_wrong_option_name():
    code = "from safety_guard import SafetyGuardCallback\nSafetyGuardCallback(max_asr_rize=5)\n"
    with pytest.raises(AssertionError, match="max_asr_rize"):
        check_python(code, "test")
    code = "from safety_guard import Guard\ng = Guard(1, 2)\ng.stepp(3)\n"
    with pytest.raises(AssertionError, match="stepp"):
        check_python(code, "test")


# -- Python blocks that run offline ----------------------------------------------------------------


def test_the_horizon_block_prints_what_it_says():
    code = block("docs/guard.md", "horizon(")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/guard.md", "exec"), {})
    said = re.search(r"# ([\d.]+)", code).group(1)
    assert out.getvalue().split()[0] == said


def test_the_custom_loop_block_runs_on_a_tiny_model(tmp_path, monkeypatch, text_tokenizer):
    import torch
    from conftest import make_model
    from guard_helpers import make_landscape, tiny_dataset
    from transformers import get_scheduler

    monkeypatch.chdir(tmp_path)
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    make_landscape(model).save("landscape.json")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = tiny_dataset(text_tokenizer)

    def train_step(model, batch):
        loss = model(input_ids=torch.tensor([batch]), labels=torch.tensor([batch])).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return loss

    scheduler = get_scheduler("linear", optimizer, 0, 4)
    namespace = {
        "model": model,
        "tokenizer": text_tokenizer,
        "num_steps": 4,
        "scheduler": scheduler,
        "train_step": train_step,
        "batches": iter(data["input_ids"]),
    }
    exec(compile(block("README.md", "guard.step("), "README.md", "exec"), namespace)
    summary = namespace["summary"]
    assert summary["checks"] == (summary["halt_step"] or 4) and summary["probes"] >= 1
    assert (tmp_path / "out" / "safety-guard" / "summary.json").exists()


def test_the_landscape_file_block_reads_a_file(tmp_path, monkeypatch):
    from conftest import make_model
    from guard_helpers import make_landscape

    from safety_guard import Landscape

    monkeypatch.chdir(tmp_path)
    make_landscape(make_model()).save("landscape.json")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block("docs/landscape.md", "Landscape.load("), "landscape.md", "exec"), {})
    visage = Landscape.load(tmp_path / "landscape.json").visage()["mean"]
    assert out.getvalue().split()[0] == str(visage)


# -- shell and YAML blocks ------------------------------------------------------------------------


def _extras() -> set[str]:
    return set(metadata("safety-guard").get_all("Provides-Extra") or [])


def _script_options(path: Path) -> set[str]:
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", path.read_text()))


def check_command(argv: list[str], where: str) -> None:
    """Parse one documented command with the parser that will read it."""
    from safety_guard.cli.main import build_parser

    while argv and re.match(r"^[A-Z_]+=", argv[0]):
        argv = argv[1:]  # environment assignments
    head = argv[0]
    if head in (".", "source") or argv[:3] == ["python3", "-m", "venv"]:
        return
    if argv[:3] == ["python", "-m", "pytest"]:
        return
    if head == "pip" and argv[1] == "install":
        for spec in argv[2:]:
            match = re.search(r"\[([\w,]+)\]", spec)
            if match:
                unknown = set(match.group(1).split(",")) - _extras()
                assert not unknown, f"{where}: no extra {unknown} in the package"
        return
    if head == "accelerate":  # accelerate launch ... -m safety_guard ARGS
        at = argv.index("-m")
        assert argv[at + 1] == "safety_guard", where
        argv, head = ["safety-guard", *argv[at + 2 :]], "safety-guard"
    if head == "safety-guard" and argv[1:2] == ["sft"]:  # TRL's parser, the guard's options
        from safety_guard.cli.sft import make_parser

        rest = argv[2:]
        if "--config" in rest:  # the user's YAML file: not ours to read
            at = rest.index("--config")
            rest = rest[:at] + rest[at + 2 :]
        _, unknown = make_parser().parse_known_args(rest)  # names only: no SFTConfig is built
        assert not unknown, f"{where}: safety-guard sft has no option {unknown}"
        return
    if head == "safety-guard":
        build_parser().parse_args(argv[1:])
        return
    if head == "torchrun":
        at = argv.index("-m")
        assert argv[at + 1] == "safety_guard", where
        build_parser().parse_args(argv[at + 2 :])
        return
    if head in ("python", "python3") and argv[1].endswith(".py"):
        script = ROOT / argv[1]
        assert script.exists(), f"{where}: {argv[1]} does not exist"
        options = {a.split("=")[0] for a in argv[2:] if a.startswith("--")}
        unknown = options - _script_options(script)
        assert not unknown, f"{where}: {argv[1]} has no option {unknown}"
        return
    raise AssertionError(f"{where}: no check for the command {' '.join(argv)!r}")


@pytest.mark.parametrize(("where", "code"), blocks("bash"), ids=[b[0] for b in blocks("bash")])
def test_shell_blocks_parse(where, code):
    for line in code.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|\|\|", line):
            argv = shlex.split(part, comments=True)
            if argv:
                check_command(argv, where)


def test_the_command_check_catches_a_wrong_option():
    with pytest.raises(SystemExit):
        check_command(["safety-guard", "landscape", "M", "-o", "x", "--num-directons", "3"], "t")
    with pytest.raises(AssertionError, match="no option"):
        check_command(["safety-guard", "sft", "--output_dir", "o", "--max-asr-rice", "5"], "t")
    with pytest.raises(AssertionError, match="no extra"):
        check_command(["pip", "install", "safety-guard[plot]"], "t")


@pytest.mark.parametrize(("where", "code"), blocks("yaml"), ids=[b[0] for b in blocks("yaml")])
def test_yaml_blocks_load(where, code):
    config = yaml.safe_load(code)
    assert config["distributed_type"] in ("FSDP", "DEEPSPEED"), where
