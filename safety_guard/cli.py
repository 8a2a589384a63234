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
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

TESTBED = "testbed"


def _add_landscape(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--output", "-o", required=True, help="Landscape JSON file to write.")
    p.add_argument("--plot", help="Also write a PNG plot here.")
    g = p.add_argument_group("directions")
    g.add_argument("--direction", choices=["random", "interpolation"], default="random")
    g.add_argument(
        "--target",
        help="Interpolation target: finetuned model folder/.safetensors or LoRA adapter folder.",
    )
    g.add_argument("--dims", type=int, choices=[1, 2], default=1)
    g.add_argument(
        "--num-directions", type=int, default=3, help="Random 1D directions (default 3)."
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--grid",
        default=None,
        help="α grid: start:stop:count or a comma list, written --grid=-0.5:0.5:21 (default -0.5:0.5:21; interpolation -0.5:1.5:21).",
    )
    g.add_argument("--beta-grid", default=None, help="β grid for 2D (default: the α grid).")
    g.add_argument(
        "--search",
        choices=["adaptive", "grid"],
        default=None,
        help="adaptive edge bisection (1D default) or full grid.",
    )
    g.add_argument(
        "--edge-asr",
        type=float,
        default=100.0,
        help="ASR %% at or above which a point is outside the basin (paper: 100).",
    )
    g.add_argument("--normalization", choices=["layer", "filter", "none"], default="layer")
    g.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="Regex of parameter names not to perturb (repeatable).",
    )
    g.add_argument(
        "--offload",
        choices=["cpu", "disk"],
        default="cpu",
        help="Where the copy of the original weights lives.",
    )
    q = p.add_argument_group("probing")
    q.add_argument(
        "--harmful",
        default="builtin:harmful",
        help="Harmful prompts: builtin:harmful, a CSV (goal column), JSONL, TXT or dataset name.",
    )
    q.add_argument("--prompt-column", default=None, help="Column/key holding the prompt.")
    q.add_argument(
        "--num-prompts", type=int, default=80, help="Harmful prompts per point (paper: 80)."
    )
    q.add_argument(
        "--benign", default="builtin:benign", help="Benign prompts for the capability measure."
    )
    q.add_argument(
        "--num-benign", type=int, default=16, help="Benign prompts for capability (0: off)."
    )
    q.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="Decode budget per response (default 24; --paper: 512).",
    )
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument(
        "--paper",
        action="store_true",
        help="The paper's probing: 512 new tokens, every response decoded to the end, full grid.",
    )
    sp = q.add_mutually_exclusive_group()
    sp.add_argument("--system-prompt", default=None, help="Custom system prompt.")
    sp.add_argument("--no-system-prompt", action="store_true", help="Send an empty system message.")
    q.add_argument(
        "--plain-template",
        action="store_true",
        help="Use a plain instruction template (models without a chat template).",
    )
    q.add_argument(
        "--judge",
        default="keyword",
        help="keyword (default), a keyword file, or pipeline:MODEL (text-classification).",
    )
    q.add_argument(
        "--unsafe-label",
        action="append",
        default=None,
        metavar="LABEL",
        help="A label of the pipeline:MODEL classifier that means unsafe (repeatable; default: "
        "the labels of its id2label named unsafe/harmful/toxic).",
    )
    m = p.add_argument_group("model")
    m.add_argument("--dtype", default="float32", help="float32 (paper), bfloat16 or float16.")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N.")
    m.add_argument("--gguf-file", default=None, help="GGUF file name inside the model folder.")
    p.add_argument(
        "--no-resume", action="store_true", help="Refuse to continue an existing output file."
    )
    p.add_argument("--quiet", "-q", action="store_true", help="No progress bar.")
    p.set_defaults(func=_cmd_landscape)


def _resolve_model_id(model: str) -> str:
    if model != TESTBED:
        return model
    from .testbed import build_testbed

    return str(build_testbed())


def _cmd_landscape(args: argparse.Namespace) -> int:
    from .directions import InterpolationDirection, LoraDirection
    from .judges import build_judge
    from .landscape import LandscapeConfig, compute_landscape, parse_grid
    from .models import load_model
    from .probe import ProbeConfig, SafetyProbe
    from .weights import ParameterSelection

    interpolation = args.direction == "interpolation"
    if interpolation and not args.target:
        raise ValueError(
            "--direction interpolation needs --target (finetuned model or LoRA adapter)."
        )
    grid = parse_grid(args.grid or ("-0.5:1.5:21" if interpolation else "-0.5:0.5:21"))
    search = args.search or (
        "grid" if args.paper or args.dims == 2 or interpolation else "adaptive"
    )
    config = LandscapeConfig(
        kind=args.direction,
        dims=args.dims,
        num_directions=args.num_directions,
        seed=args.seed,
        alphas=grid,
        betas=parse_grid(args.beta_grid) if args.beta_grid else None,
        search=search,
        edge_asr=args.edge_asr,
        normalization=args.normalization,
        selection=ParameterSelection(exclude=args.exclude),
        offload=args.offload,
    )
    probe_config = ProbeConfig(
        harmful=args.harmful,
        num_harmful=args.num_prompts,
        benign=args.benign,
        num_benign=args.num_benign,
        max_new_tokens=args.max_new_tokens or (512 if args.paper else 24),
        batch_size=args.batch_size,
        early_stop=not args.paper,
        template="plain" if args.plain_template else "chat",
        system_prompt="" if args.no_system_prompt else args.system_prompt,
        prompt_column=args.prompt_column,
    )
    model_id = _resolve_model_id(args.model)
    model, tokenizer = load_model(
        model_id, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file
    )
    direction = None
    if interpolation:
        target = Path(args.target)
        if (target / "adapter_config.json").exists():
            direction = LoraDirection(target)
        elif target.exists():
            direction = InterpolationDirection(target)
        else:
            raise FileNotFoundError(f"--target {target} does not exist.")
    probe = SafetyProbe(
        model, tokenizer, probe_config, judge=build_judge(args.judge, args.unsafe_label)
    )
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
    _print_summary(land)
    print(f"saved {args.output}")
    if args.plot:
        from .plotting import plot_landscape

        print(f"plot  {plot_landscape(land, args.plot)}")
    return 0


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
    summary = land.data.get("summary") or {}
    print(
        f"points measured: {summary.get('num_points')}  decoded tokens: {summary.get('decoded_tokens')}"
    )


def _cmd_visage(args: argparse.Namespace) -> int:
    from .landscape import Landscape

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
        try:
            out["basin_radius"] = land.basin_radius()
        except ValueError:
            out["basin_radius"] = None
        print(json.dumps(out))
    else:
        note = "" if land.complete else " (incomplete landscape)"
        print(f"{v['mean']:.2f}{note}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_landscape

    print(plot_landscape(args.file, args.output))
    return 0


def _cmd_testbed(args: argparse.Namespace) -> int:
    from .testbed import run_testbed_command

    run_testbed_command(rebuild=args.rebuild)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

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
    pl = sub.add_parser("plot", help="Plot a landscape file to PNG.")
    pl.add_argument("file")
    pl.add_argument("--output", "-o", required=True, help="PNG file to write.")
    pl.set_defaults(func=_cmd_plot)
    t = sub.add_parser(
        "testbed",
        help="Build (or reuse) the offline aligned testbed model; prints its folder last.",
    )
    t.add_argument(
        "--rebuild", action="store_true", help="Build a new testbed even if one is cached."
    )
    t.set_defaults(func=_cmd_testbed)
    from .demo import add_demo_parser

    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safety-guard`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"safety-guard: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safety-guard: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
