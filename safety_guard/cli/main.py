"""The ``safety-guard`` command line.

Example:
    $ safety-guard landscape --output landscape.json          # the testbed, 3 random directions
    $ safety-guard landscape ./my-chat-model --output l.json --num-prompts 80 --dtype bf16
    $ safety-guard visage landscape.json --json
    $ safety-guard plot landscape.json --output landscape.png
    $ safety-guard testbed                                    # last line: the model folder
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safety_guard._extras import MissingExtraError
from safety_guard._options import (
    add_const_option,
    add_dataclass_options,
    field_default,
    given_options,
)

if TYPE_CHECKING:
    from safety_guard.landscape import LandscapeConfig
    from safety_guard.measure.probe import ProbeConfig

__all__ = ["build_parser", "landscape_configs", "main"]

TESTBED = "testbed"


#: The α grid of an interpolation landscape when --grid is not given: past the finetuned model.
INTERPOLATION_GRID = "-0.5:1.5:21"
_LANDSCAPE, _PROBE = "landscape.", "probe."


def _add_landscape(sub: argparse._SubParsersAction) -> None:
    """The ``landscape`` subcommand; its direction and probing options come from the dataclasses.

    Every :class:`~safety_guard.landscape.LandscapeConfig` and
    :class:`~safety_guard.measure.probe.ProbeConfig` field is an option (help and default from the
    field); the established names are kept as the first option string (``--direction`` for
    ``kind``, ``--grid`` for ``alphas``, ``--beta-grid`` for ``betas``, ``--num-prompts`` for
    ``num_harmful``), with the field's own name as an alias.
    """
    from safety_guard.landscape import LandscapeConfig, format_grid, parse_grid
    from safety_guard.measure.probe import PAPER_PROBE, ProbeConfig
    from safety_guard.models.parameters import ParameterSelection

    p = sub.add_parser(
        "landscape",
        help="Compute the safety landscape of a chat model and save it.",
        description="Perturb MODEL along random (or interpolation) directions and measure keyword "
        "ASR and capability at each point. The file is rewritten after every point; running the "
        "same command again resumes an interrupted run.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=TESTBED,
        help="Model folder, hub id or .gguf file (default: the offline testbed, built on first use).",
    )
    p.add_argument(
        "--output",
        "-o",
        required=True,
        help="Landscape JSON file to write (OUTPUT.lock keeps a second command off it).",
    )
    p.add_argument("--plot", help="Also write a PNG plot here.")
    g = p.add_argument_group("directions")
    add_dataclass_options(
        g,
        LandscapeConfig,
        prefix=_LANDSCAPE,
        flags={
            "kind": ["--direction", "--kind"],
            "alphas": ["--grid", "--alphas"],
            "betas": ["--beta-grid", "--betas"],
        },
        skip={"selection"},
        parse={"alphas": parse_grid, "betas": parse_grid},
        show={"alphas": format_grid},
        notes={
            "alphas": f"--direction interpolation: {INTERPOLATION_GRID}",
            "betas": "default: the α grid",
            "search": "grid with --paper, --dims 2 or --direction interpolation",
        },
    )
    g.add_argument(
        "--target",
        help="Interpolation target: finetuned model folder/.safetensors or LoRA adapter folder.",
    )
    g.add_argument(
        "--exclude",
        action="append",
        dest=_LANDSCAPE + "exclude",
        default=argparse.SUPPRESS,
        metavar="REGEX",
        help=ParameterSelection.__dataclass_fields__["exclude"].metadata["help"] + " (repeatable).",
    )
    q = p.add_argument_group("probing")
    probe_flags = {"num_harmful": ["--num-prompts", "--num-harmful"]}
    add_dataclass_options(
        q,
        ProbeConfig,
        prefix=_PROBE,
        flags=probe_flags,
        skip={"system_prompt"},
        notes={
            "max_new_tokens": f"--paper: {PAPER_PROBE.max_new_tokens}",
            "early_stop": f"--paper: {PAPER_PROBE.early_stop}",
            "signal": f"--paper: {PAPER_PROBE.signal}",
            "batch_size": f"--paper: {PAPER_PROBE.batch_size}",
        },
    )
    add_const_option(
        q,
        "--plain-template",
        prefix=_PROBE,
        name="template",
        value="plain",
        help="Same as --template plain (models without a chat template).",
    )
    sp = q.add_mutually_exclusive_group()
    add_dataclass_options(sp, ProbeConfig, prefix=_PROBE, only={"system_prompt"})
    add_const_option(
        sp,
        "--no-system-prompt",
        prefix=_PROBE,
        name="system_prompt",
        value="",
        help="Send an empty system message (same as --system-prompt '').",
    )
    q.add_argument(
        "--paper",
        action="store_true",
        help="The paper's probing: every prompt generated, "
        f"{PAPER_PROBE.max_new_tokens} new tokens, every response decoded to the end, full grid.",
    )
    _add_judge_options(q)
    m = p.add_argument_group("model")
    m.add_argument("--dtype", default="float32", help="float32 (paper), bfloat16 or float16.")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N.")
    m.add_argument("--gguf-file", default=None, help="GGUF file name inside the model folder.")
    m.add_argument(
        "--shard",
        action="store_true",
        help="Under torchrun / accelerate launch: shard the model with FSDP2 across the ranks "
        "(for a model that does not fit one device; each rank moves its own shards, every rank "
        "answers every prompt). Layer-normalized random directions and interpolation targets, "
        "1D or --dims 2. Without it every rank holds the whole model and answers its share of "
        "the prompts.",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="Refuse to continue an existing output file."
    )
    p.add_argument("--quiet", "-q", action="store_true", help="No progress bar.")
    p.set_defaults(func=_cmd_landscape)


JUDGE_HELP = (
    "keyword (default: the paper's refusal phrases), a keyword file, pipeline:MODEL (a "
    "text-classification model), llamaguard:MODEL (the Llama Guard family) or harmbench:MODEL "
    "(the HarmBench classifier); MODEL a folder or hub id."
)


def _add_judge_options(group: argparse._ArgumentGroup, judge: bool = True) -> None:
    """``--judge`` (unless ``judge`` is false), ``--unsafe-label``, ``--judge-device``,
    ``--judge-dtype``."""
    if judge:
        group.add_argument("--judge", default="keyword", help=JUDGE_HELP)
    group.add_argument(
        "--unsafe-label",
        action="append",
        default=None,
        metavar="LABEL",
        help="A label of the pipeline:MODEL classifier that means unsafe (repeatable; default: "
        "the labels of its id2label named unsafe/harmful/toxic).",
    )
    group.add_argument(
        "--judge-device",
        default="auto",
        help="Device of a llamaguard:/harmbench: judge (auto, cpu, cuda:N): it may sit on "
        "another GPU than the model.",
    )
    group.add_argument(
        "--judge-dtype", default="bfloat16", help="Weight dtype of a llamaguard:/harmbench: judge."
    )


def _judge(args: argparse.Namespace, spec: str | None) -> Any:
    from safety_guard.measure.judges import build_judge

    return build_judge(spec, args.unsafe_label, device=args.judge_device, dtype=args.judge_dtype)


def landscape_configs(args: argparse.Namespace) -> tuple[LandscapeConfig, ProbeConfig]:
    """The ``(LandscapeConfig, ProbeConfig)`` of parsed ``safety-guard landscape`` arguments.

    Options not given keep the dataclass default, except where the command line changes it:
    ``--direction interpolation`` walks the grid ``-0.5:1.5:21``; ``--paper``, ``--dims 2`` and
    interpolation search the full grid; ``--paper`` generates every prompt and decodes every
    response to ``PAPER_PROBE.max_new_tokens``.

    Example:
        >>> args = build_parser().parse_args(["landscape", "-o", "l.json", "--paper"])
        >>> landscape, probe = landscape_configs(args)
        >>> landscape.search, probe.max_new_tokens, probe.early_stop, probe.signal
        ('grid', 512, False, 'generate')
    """
    from safety_guard.landscape import LandscapeConfig, parse_grid
    from safety_guard.measure.probe import PAPER_PROBE, ProbeConfig
    from safety_guard.models.parameters import ParameterSelection

    land = given_options(args, LandscapeConfig, prefix=_LANDSCAPE)
    probe = given_options(args, ProbeConfig, prefix=_PROBE)
    paper = getattr(args, "paper", False)
    interpolation = land.get("kind", field_default(LandscapeConfig, "kind")) == "interpolation"
    dims = land.get("dims", field_default(LandscapeConfig, "dims"))
    if interpolation:
        land.setdefault("alphas", parse_grid(INTERPOLATION_GRID))
    if paper or dims == 2 or interpolation:
        land.setdefault("search", "grid")
    exclude = getattr(args, _LANDSCAPE + "exclude", None)
    if exclude:
        land["selection"] = ParameterSelection(exclude=exclude)
    if paper:
        probe.setdefault("max_new_tokens", PAPER_PROBE.max_new_tokens)
        probe.setdefault("early_stop", PAPER_PROBE.early_stop)
        probe.setdefault("signal", PAPER_PROBE.signal)
        probe.setdefault("batch_size", PAPER_PROBE.batch_size)
    return LandscapeConfig(**land), ProbeConfig(**probe)


def _resolve_model_id(model: str) -> str:
    if model != TESTBED:
        return model
    from safety_guard.testbed import build_testbed

    return str(build_testbed())


def _cmd_landscape(args: argparse.Namespace) -> int:
    """Check the settings, the device and the outputs (before the model loads), then compute
    the landscape holding the lock of ``--output`` (a second writer is refused)."""
    from safety_guard.files import check_writable, output_lock
    from safety_guard.models.loading import resolve_device

    configs = landscape_configs(args)
    resolve_device(args.device)  # an unknown or absent device, before minutes of loading
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the main process writes
        return _run_landscape(args, *configs)
    check_writable(args.output, "--output")
    if args.plot:
        check_writable(args.plot, "--plot")
    with output_lock(args.output, "--output"):
        return _run_landscape(args, *configs)


def _run_landscape(
    args: argparse.Namespace, config: LandscapeConfig, probe_config: ProbeConfig
) -> int:
    import torch

    from safety_guard.guard.baseline import record_guard_baseline
    from safety_guard.landscape import compute_landscape
    from safety_guard.landscape.directions import InterpolationDirection, LoraDirection
    from safety_guard.measure.probe import SafetyProbe
    from safety_guard.models.loading import load_model
    from safety_guard.plots import plot_landscape, require_matplotlib

    if args.plot:
        require_matplotlib()  # before the landscape's minutes, not after
    interpolation = config.kind == "interpolation"
    if interpolation and not args.target:
        raise ValueError(
            "--direction interpolation needs --target (finetuned model or LoRA adapter)."
        )
    model_id = _resolve_model_id(args.model)
    device = _init_distributed(args.device)
    model, tokenizer = load_model(
        model_id, dtype=args.dtype, device=device, gguf_file=args.gguf_file
    )
    if args.shard:
        if not torch.distributed.is_initialized():
            raise ValueError(
                "--shard splits the model across the ranks of torchrun / accelerate launch: run "
                "e.g. `torchrun --nproc_per_node 8 -m safety_guard landscape ... --shard`."
            )
        from safety_guard.engines.shards import shard_model

        shard_model(model)
    direction = None
    if interpolation:
        target = Path(args.target)
        if (target / "adapter_config.json").exists():
            direction = LoraDirection(target)
        elif target.exists():
            direction = InterpolationDirection(target)
        else:
            raise FileNotFoundError(f"--target {target} does not exist.")
    probe = SafetyProbe(model, tokenizer, probe_config, judge=_judge(args, args.judge))
    land = compute_landscape(
        model,
        tokenizer,
        config,
        probe,
        interpolation=direction,
        output=args.output,
        resume=not args.no_resume,
        progress=not args.quiet,
        model_name=args.model if args.model != TESTBED else f"testbed ({model_id})",
    )
    if "guard_baseline" not in land.data:  # what a guard of this model measures at train begin
        record_guard_baseline(
            land, model, tokenizer, probe_config.system_prompt, args.output, probe.judge
        )
    from safety_guard.engines.collectives import barrier, rank_and_world

    if rank_and_world()[0] == 0:
        _print_summary(land)
        print(f"saved {args.output}")
        if args.plot:
            print(f"plot  {plot_landscape(land, args.plot)}")
    if torch.distributed.is_initialized():  # leave together, then tear the group down
        barrier()
        torch.distributed.destroy_process_group()
    return 0


def _init_distributed(device: str) -> str:
    """Under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1): join the process group
    (NCCL on GPUs, gloo on CPUs) and give each rank its own GPU; returns the device to load on.

    Every rank holds the whole model and answers its share of the prompts; the main process
    writes the file.
    """
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or torch.distributed.is_initialized():
        return device
    cuda = torch.cuda.is_available() and device != "cpu"
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def _print_summary(land) -> None:
    origin = land.origin or {}
    print(
        f"unperturbed model: ASR {origin.get('asr', float('nan')):.1f} %  capability NLL {origin.get('nll')}"
    )
    for i, curve in enumerate(land.curves()):
        basin = curve["basin"] or {}
        lower, upper = basin.get("lower"), basin.get("upper")
        span = f"[{lower:+.3f}, {upper:+.3f}]" if lower is not None and upper is not None else "n/a"
        points = ", ".join(
            f"{a:+.3g}:{s:.0f}%" for a, s in zip(curve["alphas"], curve["asr"], strict=True)
        )
        visage = curve["visage"]
        vis = f"{visage:.2f}" if visage is not None else "n/a"
        print(
            f"direction {i} {curve['direction']}: basin {span}  VISAGE {vis}\n  ASR by α: {points}"
        )
    if land.curves():
        v = land.visage()
        print(f"VISAGE {v['mean']:.2f} ± {v['std']:.2f} over {v['num_directions']} direction(s)")
    probe = land.data.get("probe") or {}
    sets = [(k, probe.get(k)) for k in ("harmful", "benign") if isinstance(probe.get(k), dict)]
    if sets:  # (the INFO log of load_prompts says which file and how many it held)
        print("prompts: " + ", ".join(f"{s.get('count')} {k} ({s.get('name')})" for k, s in sets))
    summary = land.data.get("summary") or {}
    print(
        f"points measured: {summary.get('num_points')}  decoded tokens: {summary.get('decoded_tokens')}"
    )


def _cmd_visage(args: argparse.Namespace) -> int:
    from safety_guard.landscape import Landscape

    land = Landscape.load(args.file)
    v = land.visage()
    if args.json:
        out = {
            "visage": v["mean"],
            "visage_std": v["std"],
            "per_direction": v["per_direction"],
            "num_directions": v["num_directions"],
            "complete": land.complete,
            "edge_asr": land.edge_asr,
            "origin_asr": (land.origin or {}).get("asr"),
        }
        out["basin_radius"] = land.basin_radius() if land.has_basin_radius() else None
        print(json.dumps(out))
    else:
        note = "" if land.complete else " (incomplete landscape)"
        print(f"{v['mean']:.2f}{note}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from safety_guard.plots import plot_landscape

    path = Path(args.file)
    if path.is_dir() or path.name in ("trajectory.jsonl", "summary.json"):  # a guarded run
        folder = path if path.is_dir() else path.parent
        if args.target_step is not None and args.landscape is None:
            raise ValueError("--target-step goes with --landscape (the run's path over it).")
        if args.landscape is not None:
            from safety_guard.guard.outputs import plot_run_path

            print(plot_run_path(folder, args.landscape, args.output, args.target_step))
            return 0
        from safety_guard.guard.outputs import plot_run_folder

        print(plot_run_folder(folder, args.output))
        return 0
    if args.landscape is not None or args.target_step is not None:
        raise ValueError(
            "--landscape and --target-step draw a guarded run's path: FILE must be the run's "
            "folder (trajectory.jsonl, summary.json)."
        )
    print(plot_landscape(args.file, args.output))
    return 0


def _cmd_judge_agreement(args: argparse.Namespace) -> int:
    from safety_guard.landscape.answers import recorded_answers
    from safety_guard.measure.agreement import judge_agreement

    specs = args.judge or []
    if len(specs) > 2:
        raise ValueError(f"--judge names the two judges to compare; got {len(specs)}.")
    specs = ["keyword"] * (2 - len(specs)) + specs
    records = recorded_answers(args.file)  # a file without answers fails before any judge loads
    judges = [_judge(args, spec) for spec in specs]
    report = judge_agreement(
        [r.prompt for r in records],
        [r.answer for r in records],
        *judges,
        where=[r.where for r in records],
    )
    if args.output:
        Path(args.output).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    print(json.dumps(report.to_dict()) if args.json else report.format())
    return 0


def _add_judge_agreement(sub: argparse._SubParsersAction) -> None:
    j = sub.add_parser(
        "judge-agreement",
        help="Compare two judges on the answers a file recorded (agreement, Cohen's kappa).",
        description="Judge every answer FILE recorded with two judges and print how they agree: "
        "the cross table, the share of equal verdicts and Cohen's kappa. FILE: a landscape file "
        "(its points' answers, computed with --record-answers, and the aligned model's answers "
        'the guard recorded in it) or a JSONL file of {"prompt", "response"} records.',
    )
    j.add_argument("file", help="Landscape JSON or prompt/response JSONL file.")
    j.add_argument(
        "--judge",
        action="append",
        metavar="JUDGE",
        help="A judge to compare (give it twice for A and B; once: A is the keyword judge). "
        + JUDGE_HELP,
    )
    _add_judge_options(j, judge=False)
    j.add_argument("--json", action="store_true", help="Print the report as one JSON object.")
    j.add_argument("--output", "-o", help="Also write the report (JSON) here.")
    j.set_defaults(func=_cmd_judge_agreement)


def _cmd_testbed(args: argparse.Namespace) -> int:
    from safety_guard.testbed import run_testbed_command

    run_testbed_command(rebuild=args.rebuild)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from safety_guard import __version__

    parser = argparse.ArgumentParser(
        prog="safety-guard",
        description="Safety landscape (safety basin, VISAGE) of chat LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"safety-guard {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_landscape(sub)
    v = sub.add_parser("visage", help="Print the VISAGE score of a landscape file.")
    v.add_argument("file")
    v.add_argument(
        "--json", action="store_true", help="Print a JSON object (key 'visage' and more)."
    )
    v.set_defaults(func=_cmd_visage)
    pl = sub.add_parser(
        "plot",
        help="Plot a landscape file, or a guarded run's folder (its trajectory), to PNG.",
    )
    pl.add_argument(
        "file",
        help="A landscape JSON file, or a guarded run's folder (trajectory.jsonl, summary.json).",
    )
    pl.add_argument("--output", "-o", required=True, help="PNG file to write.")
    pl.add_argument(
        "--landscape",
        help="With a run's folder: draw the run's path over this 2D landscape, spanned by its "
        "finetune direction (safety-guard landscape --direction interpolation --target "
        "RUN/last-safe --dims 2).",
    )
    pl.add_argument(
        "--target-step",
        type=int,
        help="The step whose weights the landscape's target holds (default: read from the "
        "safety_guard_step.json beside it).",
    )
    pl.set_defaults(func=_cmd_plot)
    t = sub.add_parser(
        "testbed",
        help="Build (or reuse) the offline aligned testbed model; prints its folder last.",
    )
    t.add_argument(
        "--rebuild", action="store_true", help="Build a new testbed even if one is cached."
    )
    t.set_defaults(func=_cmd_testbed)
    _add_judge_agreement(sub)
    sft = sub.add_parser(
        "sft",
        add_help=False,
        help="TRL's `trl sft` with the guard attached (same arguments, plus the guard's; "
        "`safety-guard sft --help`).",
    )
    sft.set_defaults(func=_cmd_sft_misplaced)
    from safety_guard.testbed.finetune import add_demo_parser

    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safety-guard`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    sft = argv[:1] == ["sft"]  # TRL's parser takes every argument after it
    if sft:
        args = argparse.Namespace(verbose=False, func=_cmd_sft, sft_argv=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    prog = "safety-guard sft" if sft else "safety-guard"
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, MissingExtraError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if sft:  # a finetune resumes from its checkpoints, not by running the command again
            raise
        print("safety-guard: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


def _cmd_sft(args: argparse.Namespace) -> int:
    from safety_guard.cli.sft import main as sft_main

    return sft_main(args.sft_argv)


def _cmd_sft_misplaced(args: argparse.Namespace) -> int:
    raise ValueError(
        "`sft` comes first and takes every option after it: safety-guard sft --help "
        "(TRL's arguments and the guard's)."
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
