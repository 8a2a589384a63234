"""Cost of a safety landscape: memory and time of weight moves (Part A), decode work (Part B).

Part A builds a Llama-shaped model with random weights (8 layers, hidden 768, vocab 32000,
untied: 99.5M float32 parameters) and, each variant in a fresh subprocess so that peak RSS is
clean, runs one of:

* ``moves-cpu`` / ``moves-disk``: 10 random moves ``apply(α)`` + ``restore()`` of
  :class:`~safety_guard.perturb.WeightPerturbation` along one random direction, with the copy of
  θ₀ in RAM or in a scratch file;
* ``landscape-cpu`` / ``landscape-disk``: a real 1D landscape (:func:`compute_landscape`, 1 random
  direction, α ∈ {-0.2, -0.1, 0, 0.1, 0.2}, grid search, 8 harmful + 4 benign prompts, 8 new
  tokens) with the tests' tiny offline tokenizer.

The child records RSS after imports (+ tokenizer) as the baseline, after building the model, and
the lifetime peak (``ru_maxrss``); it checks that the weights are bit-exact afterwards (sha256 of
all parameter bytes). The memory goal is ``peak − baseline ≤ 1.1 × weights + largest tensor``.

Part B (``--testbed``) needs the aligned testbed (``safety_guard.testbed``) to be built already;
it is never built here. It runs the default 21-point grid over [-0.5, 0.5] along one random
direction (seed 0) with ``ProbeConfig(num_harmful=40, num_benign=8)``, once with
``search="grid"`` and once with ``search="adaptive"``, and compares points, decoded tokens and
wall time. ``--paper-subset N`` also measures the paper's probing (512 new tokens, no early stop)
on N points only (α = 0, then the first points outside the basin, then the nearest others) and
extrapolates its decoded tokens to the 21-point grid (labelled "extrapolated").

Timings are wall-clock on a shared machine and are noisy; memory figures are much more stable.

Usage:
    python benchmarks/landscape_cost.py                      # Part A, all four variants
    python benchmarks/landscape_cost.py --variants moves-disk --moves 3
    python benchmarks/landscape_cost.py --skip-part-a --testbed --paper-subset 3

Results: ``landscape_cost_part_a.{md,csv}`` and ``landscape_cost_part_b.{md,csv}`` in
``--output-dir`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import subprocess
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

    from safety_guard.directions import RandomDirection
    from safety_guard.landscape import LandscapeConfig, compute_landscape
    from safety_guard.perturb import WeightPerturbation
    from safety_guard.probe import ProbeConfig

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
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                variant,
                "--layers",
                str(args.layers),
                "--moves",
                str(args.moves),
                "--result-file",
                str(result_file),
            ]
            print(f"[part A] {variant}: running in a fresh subprocess ...", flush=True)
            proc = subprocess.run(cmd, check=False, timeout=args.child_timeout)
            if proc.returncode != 0 or not result_file.exists():
                print(f"[part A] {variant} FAILED (exit {proc.returncode})", flush=True)
                continue
            result = json.loads(result_file.read_text(encoding="utf-8"))
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


# -- Part B ---------------------------------------------------------------------------------------


def testbed_status() -> tuple[bool, str]:
    """Whether the testbed module exists and a finished testbed is in the cache (never builds)."""
    try:
        from safety_guard.testbed import load_testbed, read_marker, testbed_dir
    except ImportError as err:
        return False, f"safety_guard.testbed.load_testbed is not available ({err})."
    del load_testbed
    folder = testbed_dir()
    if read_marker(folder) is None:
        return False, (
            f"no finished testbed in {folder} (no valid testbed.json): building it is not this "
            "benchmark's job; run `safety-guard testbed` first."
        )
    return True, str(folder)


def _landscape_row(
    name: str, land: Any, wall: float, max_new_tokens: int, early_stop: bool
) -> dict[str, Any]:
    summary = land.data["summary"]
    edges = land.edges()[0] if land.edges() else None
    points = summary["num_points"]
    return {
        "variant": name,
        "max_new_tokens": max_new_tokens,
        "early_stop": early_stop,
        "points measured": points,
        "decoded tokens": summary["decoded_tokens"],
        "tokens/point": round(summary["decoded_tokens"] / max(points, 1), 1),
        "wall s": round(wall, 1),
        "s/point": round(wall / max(points, 1), 2),
        "VISAGE": round(land.visage()["mean"], 2),
        "basin lower": edges.lower if edges else None,
        "basin upper": edges.upper if edges else None,
        "note": "measured",
    }


def _paper_points(grid: tuple[float, ...], land: Any, n: int) -> list[float]:
    """α = 0, the first grid points outside the basin on each side, then the nearest others."""
    chosen = [0.0]
    edges = land.edges()[0]
    for a in (edges.upper_outside, edges.lower_outside):
        if a is not None and a not in chosen:
            chosen.append(a)
    for a in sorted(grid, key=lambda x: (abs(x), x)):
        if a not in chosen:
            chosen.append(a)
    return chosen[:n]


def run_part_b(args: argparse.Namespace) -> str:
    """Grid vs adaptive (and optionally the paper's probing on a subset) on the testbed."""
    ok, message = testbed_status()
    if not ok:
        text = f"## Part B: skipped\n\nPart B skipped: {message}\n"
        print(f"[part B] skipped: {message}", flush=True)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "landscape_cost_part_b.md").write_text(text, encoding="utf-8")
        return text

    import torch

    from safety_guard.directions import RandomDirection
    from safety_guard.landscape import LandscapeConfig, compute_landscape
    from safety_guard.perturb import WeightPerturbation
    from safety_guard.probe import ProbeConfig, SafetyProbe
    from safety_guard.testbed import load_testbed

    torch.set_grad_enabled(False)
    model, tokenizer = load_testbed(progress=False)
    probe_cfg = ProbeConfig(num_harmful=40, num_benign=8)
    rows: list[dict[str, Any]] = []
    lands: dict[str, Any] = {}
    for search in ("grid", "adaptive"):
        config = LandscapeConfig(num_directions=1, seed=0, search=search)
        print(f"[part B] {search}: {len(config.alphas)}-point grid ...", flush=True)
        start = time.perf_counter()
        land = compute_landscape(model, tokenizer, config, probe_cfg, progress=False)
        wall = time.perf_counter() - start
        lands[search] = land
        rows.append(
            _landscape_row(search, land, wall, probe_cfg.max_new_tokens, probe_cfg.early_stop)
        )
        print(f"[part B] {search}: {rows[-1]}", flush=True)

    grid_row, adaptive_row = rows[0], rows[1]
    rows.append(
        {
            "variant": "ratio grid/adaptive",
            "max_new_tokens": "",
            "early_stop": "",
            "points measured": round(
                grid_row["points measured"] / max(adaptive_row["points measured"], 1), 2
            ),
            "decoded tokens": round(
                grid_row["decoded tokens"] / max(adaptive_row["decoded tokens"], 1), 2
            ),
            "tokens/point": round(
                grid_row["tokens/point"] / max(adaptive_row["tokens/point"], 1e-9), 2
            ),
            "wall s": round(grid_row["wall s"] / max(adaptive_row["wall s"], 1e-9), 2),
            "s/point": "",
            "VISAGE": f"Δ {grid_row['VISAGE'] - adaptive_row['VISAGE']:+.2f}",
            "basin lower": "",
            "basin upper": "",
            "note": "ratio",
        }
    )

    footer_extra = ""
    if args.paper_subset:
        grid = tuple(LandscapeConfig().alphas)
        points = _paper_points(grid, lands["grid"], args.paper_subset)
        paper_cfg = ProbeConfig(
            num_harmful=probe_cfg.num_harmful,
            num_benign=probe_cfg.num_benign,
            max_new_tokens=512,
            early_stop=False,
        )
        print(f"[part B] paper setting on α ∈ {points} ...", flush=True)
        start = time.perf_counter()
        prober = SafetyProbe(model, tokenizer, paper_cfg)
        prober.prepare()
        measured: list[tuple[float, int, float, float]] = []  # (α, tokens, asr, seconds)
        with WeightPerturbation(model, [RandomDirection(seed=0)]) as move:
            for alpha in points:
                move.apply(alpha)
                try:
                    result = prober.evaluate()
                finally:
                    move.restore()
                measured.append((alpha, result.decoded_tokens, result.asr, result.seconds))
                print(f"[part B] paper α={alpha:+.2f}: {measured[-1]}", flush=True)
        wall = time.perf_counter() - start
        tokens = sum(m[1] for m in measured)
        per_point = tokens / len(measured)
        rows.append(
            {
                "variant": f"paper, {len(measured)} points",
                "max_new_tokens": 512,
                "early_stop": False,
                "points measured": len(measured),
                "decoded tokens": tokens,
                "tokens/point": round(per_point, 1),
                "wall s": round(wall, 1),
                "s/point": round(wall / len(measured), 2),
                "VISAGE": "",
                "basin lower": "",
                "basin upper": "",
                "note": "measured (α = " + ", ".join(f"{m[0]:+.2f}" for m in measured) + ")",
            }
        )
        n_grid = len(grid)
        rows.append(
            {
                "variant": f"paper, {n_grid}-point grid",
                "max_new_tokens": 512,
                "early_stop": False,
                "points measured": n_grid,
                "decoded tokens": round(per_point * n_grid),
                "tokens/point": round(per_point, 1),
                "wall s": round(wall / len(measured) * n_grid, 1),
                "s/point": round(wall / len(measured), 2),
                "VISAGE": "",
                "basin lower": "",
                "basin upper": "",
                "note": f"EXTRAPOLATED from {len(measured)} points (tokens/point × {n_grid})",
            }
        )
        rows.append(
            {
                "variant": "ratio paper-extrapolated/adaptive",
                "max_new_tokens": "",
                "early_stop": "",
                "points measured": round(n_grid / max(adaptive_row["points measured"], 1), 2),
                "decoded tokens": round(
                    per_point * n_grid / max(adaptive_row["decoded tokens"], 1), 1
                ),
                "tokens/point": "",
                "wall s": round(
                    wall / len(measured) * n_grid / max(adaptive_row["wall s"], 1e-9), 1
                ),
                "s/point": "",
                "VISAGE": "",
                "basin lower": "",
                "basin upper": "",
                "note": "ratio, EXTRAPOLATED",
            }
        )
        # A stratified estimate: points inside the basin (refusals end early) decode fewer
        # tokens than points outside (compliance runs to 512), so weight by the grid run's split.
        grid_curve = lands["grid"].curves()[0]
        edge = lands["grid"].edge_asr
        inside = [m[1] for m in measured if _asr_on_grid(grid_curve, m[0]) < edge]
        outside = [m[1] for m in measured if _asr_on_grid(grid_curve, m[0]) >= edge]
        n_in = sum(1 for a in grid_curve["asr"] if a < edge)
        if inside and outside:
            stratified = n_in * sum(inside) / len(inside) + (n_grid - n_in) * sum(outside) / len(
                outside
            )
            footer_extra = (
                f" Stratified extrapolation of the paper setting (grid run: {n_in} points below "
                f"the edge ASR, {n_grid - n_in} at or above; mean tokens/point measured inside "
                f"{sum(inside) / len(inside):.0f}, outside {sum(outside) / len(outside):.0f}): "
                f"{stratified:,.0f} decoded tokens over the {n_grid}-point grid (EXTRAPOLATED)."
            )

    header = (
        "## Part B: decoded tokens per landscape point, uniform grid vs adaptive search "
        "(testbed)\n\n"
        f"1 random direction (seed 0), default grid (21 points over [-0.5, 0.5]), "
        f"ProbeConfig(num_harmful=40, num_benign=8) (24 new tokens, early stop).\n\n{NOISE_NOTE}"
    )
    footer = (
        "Decoded tokens count the harmful-prompt generations at every measured point (the "
        "summary's `decoded_tokens`), not the one-off reference answers of prepare(). Wall "
        "time includes prepare() and the capability NLL at every point." + footer_extra
    )
    return write_table(rows, args.output_dir, "landscape_cost_part_b", header, footer)


def _asr_on_grid(curve: dict[str, Any], alpha: float) -> float:
    return dict(zip(curve["alphas"], curve["asr"], strict=True))[alpha]


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
    parser.add_argument("--skip-part-a", action="store_true", help="Do not run Part A.")
    parser.add_argument(
        "--testbed",
        action="store_true",
        help="Run Part B on the aligned testbed (skipped unless it is already built).",
    )
    parser.add_argument(
        "--paper-subset",
        type=int,
        default=0,
        metavar="N",
        help="Part B: also measure the paper's probing (512 tokens, no early stop) on N points "
        "and extrapolate to the grid.",
    )
    parser.add_argument("--child", choices=PART_A_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args.layers, args.moves, args.result_file)
        return
    outputs = []
    if not args.skip_part_a:
        outputs.append(run_part_a(args))
    if args.testbed:
        outputs.append(run_part_b(args))
    if not outputs:
        print("Nothing to do: pass --testbed, or leave out --skip-part-a.")
    for text in outputs:
        print()
        print(text)
    print(f"Tables written to {args.output_dir}/")


if __name__ == "__main__":
    main()
