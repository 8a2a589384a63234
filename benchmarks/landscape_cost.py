"""Cost of a safety landscape: memory and time of its weight moves (Part A).

Part A builds a Llama-shaped model with random weights (8 layers, hidden 768, vocab 32000,
untied: 99.5M float32 parameters) and, each variant in a fresh subprocess so that peak RSS is
clean, runs one of:

* ``moves-cpu`` / ``moves-disk``: 10 random moves ``apply(α)`` + ``restore()`` of
  :class:`~safety_guard.landscape.perturb.WeightPerturbation` along one random direction, with the copy of
  θ₀ in RAM or in a scratch file;
* ``landscape-cpu`` / ``landscape-disk``: a real 1D landscape (:func:`compute_landscape`, 1 random
  direction, α ∈ {-0.2, -0.1, 0, 0.1, 0.2}, grid search, 8 harmful + 4 benign prompts, 8 new
  tokens) with the tests' tiny offline tokenizer.

The child records RSS after imports (+ tokenizer) as the baseline, after building the model, and
the lifetime peak (``ru_maxrss``); it checks that the weights are bit-exact afterwards (sha256 of
all parameter bytes). The memory goal is ``peak − baseline ≤ 1.1 × weights + largest tensor``.

The decode work of a landscape on a real model, the paper's procedure against ours, is measured
by ``benchmarks/paper_vs_ours.py``.

Timings are wall-clock on a shared machine and are noisy; memory figures are much more stable.

Usage:
    python benchmarks/landscape_cost.py                      # Part A, all four variants
    python benchmarks/landscape_cost.py --variants moves-disk --moves 3

Results: ``landscape_cost_part_a.{md,csv}`` in ``--output-dir`` (default
``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    MIB,
    build_llama,
    build_tokenizer,
    machine_info,
    max_rss_bytes,
    parameter_stats,
    parameters_sha256,
    reset_peak_rss,
    rss_bytes,
    run_in_subprocess,
    window_peak_rss_bytes,
    write_table,
)

PART_A_VARIANTS = ("moves-cpu", "moves-disk", "landscape-cpu", "landscape-disk")
PART_A_ALPHAS = (-0.2, -0.1, 0.0, 0.1, 0.2)
NOISE_NOTE = (
    "Timings are wall-clock on a shared 2-core machine where other engineers run heavy jobs "
    "at the same time: treat them as noisy (±30 % or worse); the memory figures are stable."
)


# -- Part A: child process ------------------------------------------------------------------------


def run_child(variant: str, num_layers: int, moves: int, result_file: Path) -> None:
    """Run one Part A variant in this (fresh) process and write its measurements as JSON."""
    import torch

    from safety_guard.landscape import LandscapeConfig, compute_landscape
    from safety_guard.landscape.directions import RandomDirection
    from safety_guard.landscape.perturb import WeightPerturbation
    from safety_guard.measure.probe import ProbeConfig

    offload = variant.rsplit("-", 1)[1]
    torch.set_grad_enabled(False)
    tokenizer = build_tokenizer()
    gc.collect()
    baseline = rss_bytes()

    model = build_llama(num_layers=num_layers)
    gc.collect()
    model_loaded = rss_bytes()
    stats = parameter_stats(model)
    digest_before = parameters_sha256(model)
    window_reset = reset_peak_rss()

    extra: dict[str, Any] = {}
    start = time.perf_counter()
    if variant.startswith("moves"):
        rng = random.Random(0)
        with WeightPerturbation(model, [RandomDirection(seed=0)], offload=offload) as move:
            extra["saved_bytes"] = move.saved_bytes
            for _ in range(moves):
                move.apply(rng.uniform(-0.5, 0.5))
                move.restore()
        extra["units"] = moves
        extra["unit"] = "move"
    else:
        with tempfile.TemporaryDirectory(prefix="sg-bench-") as tmp:
            land = compute_landscape(
                model,
                tokenizer,
                LandscapeConfig(
                    num_directions=1, alphas=PART_A_ALPHAS, search="grid", offload=offload
                ),
                ProbeConfig(num_harmful=8, num_benign=4, max_new_tokens=8, capability_tokens=8),
                output=Path(tmp) / "landscape.json",
                progress=False,
            )
        summary = land.data["summary"]
        extra["units"] = summary["num_points"]
        extra["unit"] = "point"
        extra["decoded_tokens"] = summary["decoded_tokens"]
    wall = time.perf_counter() - start

    window_peak = window_peak_rss_bytes() if window_reset else float("nan")
    digest_after = parameters_sha256(model)
    peak = max_rss_bytes()
    result = {
        "variant": variant,
        "offload": offload,
        **stats,
        "wall_s": wall,
        "baseline_rss": baseline,
        "model_rss": model_loaded,
        "peak_rss": peak,
        "job_window_peak_rss": window_peak,
        "bit_exact": digest_before == digest_after,
        "sha256": digest_before[:12],
        **extra,
    }
    result_file.write_text(json.dumps(result), encoding="utf-8")


# -- Part A: parent -------------------------------------------------------------------------------


def part_a_row(r: dict[str, Any]) -> dict[str, Any]:
    """One table row from a child's measurements (MiB, ratios, PASS/FAIL)."""
    weights = r["weight_bytes"]
    largest = r["largest_tensor_bytes"]
    growth = r["peak_rss"] - r["baseline_rss"]
    budget = 1.1 * weights + largest
    per_unit = r["wall_s"] / max(r["units"], 1)
    return {
        "variant": r["variant"],
        "params": r["params"],
        "weights MiB": round(weights / MIB, 1),
        "largest tensor MiB": round(largest / MIB, 1),
        "wall s": round(r["wall_s"], 2),
        "s per unit": f"{per_unit:.2f}/{r['unit']} ({r['units']} {r['unit']}s)",
        "baseline RSS MiB": round(r["baseline_rss"] / MIB, 1),
        "model-loaded RSS MiB": round(r["model_rss"] / MIB, 1),
        "peak RSS MiB": round(r["peak_rss"] / MIB, 1),
        "peak-baseline MiB": round(growth / MIB, 1),
        "peak-baseline / weights": round(growth / weights, 3),
        "goal MiB (1.1W+T)": round(budget / MIB, 1),
        "goal": "PASS" if growth <= budget else "FAIL",
        "extra over model-loaded MiB": round((r["peak_rss"] - r["model_rss"]) / MIB, 1),
        "bit-exact": "yes" if r["bit_exact"] else "NO",
    }


def run_part_a(args: argparse.Namespace) -> str:
    """Run each variant in a fresh subprocess, then print and save the table."""
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sg-bench-results-") as tmp:
        for variant in args.variants:
            result_file = Path(tmp) / f"{variant}.json"
            print(f"[part A] {variant}: running in a fresh subprocess ...", flush=True)
            child_args = ["--child", variant, "--layers", str(args.layers)]
            child_args += ["--moves", str(args.moves)]
            result = run_in_subprocess(
                __file__, child_args, result_file, f"part A {variant}", args.child_timeout
            )
            if result is None:
                continue
            results.append(result)
            print(f"[part A] {variant}: {json.dumps(result)}", flush=True)

    rows = [part_a_row(r) for r in results]
    info = machine_info()
    params = f"{results[0]['params']:,}" if results else "?"
    header = (
        f"## Part A: memory and time of weight moves and a 1D landscape ({params} parameters, "
        f"float32, {args.layers} layers)\n\n"
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram']} RAM, torch "
        f"{info['torch']} ({info['torch_threads']} threads), transformers {info['transformers']}, "
        f"Python {info['python']}.\n\n{NOISE_NOTE}"
    )
    footer = (
        "Baseline = RSS after imports and building the tokenizer; model-loaded = RSS after "
        "building the model; peak = `ru_maxrss` of the child (lifetime). Goal: peak − baseline ≤ "
        "1.1 × weights + the largest tensor. `moves-*`: "
        f"{args.moves} × (apply(α) + restore()) along one random direction, α uniform in "
        "[-0.5, 0.5]. `landscape-*`: compute_landscape, 1 direction, α ∈ "
        f"{list(PART_A_ALPHAS)}, grid, 8 harmful + 4 benign prompts, 8 new tokens; its wall time "
        "includes prepare() (reference answers) and saving the file after every point. "
        "Bit-exact: sha256 of all parameter bytes equal before and after the job."
    )
    text = write_table(rows, args.output_dir, "landscape_cost_part_a", header, footer)
    for r in results:
        if not math.isnan(r["job_window_peak_rss"]):
            print(
                f"[part A] {r['variant']}: peak RSS during the job only (VmHWM reset after the "
                f"model was built): {r['job_window_peak_rss'] / MIB:.1f} MiB"
            )
    return text


# -- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="Where the .md and .csv tables go (default: benchmarks/results/).",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=PART_A_VARIANTS,
        default=list(PART_A_VARIANTS),
        help="Part A variants to run (default: all).",
    )
    parser.add_argument("--layers", type=int, default=8, help="Decoder layers (8 ≈ 99.5M params).")
    parser.add_argument("--moves", type=int, default=10, help="Moves of the moves-* variants.")
    parser.add_argument(
        "--child-timeout", type=float, default=1800, help="Seconds per Part A subprocess."
    )
    parser.add_argument("--child", choices=PART_A_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args.layers, args.moves, args.result_file)
        return
    print()
    print(run_part_a(args))
    print(f"Tables written to {args.output_dir}/")


if __name__ == "__main__":
    main()
