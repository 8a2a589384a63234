"""Screen first or generate every prompt: the testbed's landscape both ways, back to back.

Runs ``safety-guard landscape`` on the offline testbed (the command a user types, CLI defaults)
once per variant, each in a fresh process, one after the other on the same machine:

* ``screen``: the defaults (``--signal screen``): the forward screen settles the refusals,
  only the flagged prompts and a few checked refusals are generated, and points beyond the
  basin's edge generate every prompt without screening (``--generate-above``);
* ``generate``: ``--signal generate --no-screen``: every prompt generated at every point, with
  the same generation (80 prompts per batch, the shared prefix's KV cache);
* ``previous`` (``--with-previous``): ``--signal generate --batch-size 16 --no-share-prefix``:
  the defaults before screen-first landscapes (every prompt generated in batches of 16 without
  the shared prefix, and the screen run beside at every point for the file's record).

It reports each variant's wall time (the whole command: loading, reference answers, every
point, the file), points, decoded and forward tokens, VISAGE per direction, and how the
points' verdicts compare with ``generate``'s (largest difference in unsafe answers at the
points both measured).

    python benchmarks/landscape_signals.py                  # 1D, CLI defaults (~20 min)
    python benchmarks/landscape_signals.py --with-previous
    python benchmarks/landscape_signals.py --dims 2         # 11 x 11 grid over [-0.3, 0.3]

Output: ``benchmarks/results/landscape_signals_<dims>d.{md,csv}`` and the landscape files in
``--work-dir``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, write_table

VARIANTS: dict[str, list[str]] = {
    "screen": [],
    "generate": ["--signal", "generate", "--no-screen"],
    "previous": ["--signal", "generate", "--batch-size", "16", "--no-share-prefix"],
}
SURFACE = ["--dims", "2", "--grid", "-0.3:0.3:11"]


def run_variant(name: str, dims: int, work: Path, quiet: bool) -> dict[str, Any]:
    """Run one variant's ``safety-guard landscape`` in a fresh process; its file and wall time."""
    output = work / f"{name}-{dims}d.json"
    if output.exists():
        output.unlink()
    cmd = [sys.executable, "-m", "safety_guard", "landscape", "-o", str(output), "-q"]
    cmd += VARIANTS[name] + (SURFACE if dims == 2 else [])
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=quiet, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] failed (exit {proc.returncode}): {proc.stderr or ''}")
    data = json.loads(output.read_text(encoding="utf-8"))
    print(f"[{name}] {wall:.1f} s", flush=True)
    return {"name": name, "wall": wall, "data": data, "file": output}


def _points(data: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Every measured point by (direction, α) or (α, β), θ₀ once (every line repeats it)."""
    found = {
        (i, p["alpha"]): p
        for i, d in enumerate(data["directions"])
        for p in d.get("points", [])
        if p["alpha"] != 0
    }
    if data.get("origin"):
        found[("origin",)] = data["origin"]
    for p in (data.get("surface") or {}).get("points", []):
        if p["alpha"] or p["beta"]:
            found[("surface", p["alpha"], p["beta"])] = p
    return found


def row(
    run: dict[str, Any], reference: dict[str, Any], previous: dict[str, Any] | None
) -> dict[str, Any]:
    """One table row: cost, VISAGE and agreement with ``reference`` (the generate variant);
    the wall time against ``previous`` too, when it ran."""
    data = run["data"]
    summary = data["summary"]
    points = _points(data)
    theirs = _points(reference["data"])
    shared = [k for k in points if k in theirs]
    diff = max((abs(points[k]["unsafe"] - theirs[k]["unsafe"]) for k in shared), default=0)
    signals = [p.get("signal", "generate") for p in points.values()]
    visage = (summary.get("visage") or {}).get("per_direction") or []
    screen = summary.get("screen") or {}
    return {
        "variant": run["name"],
        "started (UTC)": str(data.get("created", ""))[:16].replace("T", " "),
        "wall s": round(run["wall"], 1),
        "wall / generate": round(run["wall"] / reference["wall"], 3),
        "wall / previous": round(run["wall"] / previous["wall"], 3) if previous else "–",
        "points": len(points),
        "screened first": signals.count("screen"),
        "decoded tokens": summary.get("decoded_tokens"),
        "forward tokens": summary.get("forward_tokens", 0),
        "VISAGE per direction": ", ".join(f"{v:.1f}" for v in visage) or "–",
        "VISAGE mean": round(summary["visage"]["mean"], 2) if summary.get("visage") else "–",
        "points also in generate": len(shared),
        "largest Δ unsafe there": diff,
        "screen missed / checked": f"{screen.get('missed', '–')} / {screen.get('checked', '–')}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, choices=(1, 2), default=1)
    parser.add_argument(
        "--with-previous", action="store_true", help="Also the previous defaults' variant."
    )
    parser.add_argument("--work-dir", type=Path, default=Path("landscape-signals"))
    parser.add_argument(
        "--output-dir", type=Path, default=Path(__file__).resolve().parent / "results"
    )
    parser.add_argument("--verbose", action="store_true", help="Show each command's output.")
    parser.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        choices=list(VARIANTS),
        help="Variants whose file and wall time in --work-dir are kept from an earlier run.",
    )
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    names = ["screen", "generate"] + (["previous"] if args.with_previous else [])
    runs = {}
    for name in names:
        saved = args.work_dir / f"{name}-{args.dims}d.json"
        if name in args.reuse and saved.exists():  # measured earlier: its file and wall time
            data = json.loads(saved.read_text(encoding="utf-8"))
            wall = json.loads(saved.with_suffix(".wall").read_text(encoding="utf-8"))
            runs[name] = {"name": name, "wall": wall, "data": data, "file": saved}
            continue
        runs[name] = run_variant(name, args.dims, args.work_dir, not args.verbose)
        saved.with_suffix(".wall").write_text(json.dumps(runs[name]["wall"]), encoding="utf-8")
    rows = [row(runs[name], runs["generate"], runs.get("previous")) for name in names]
    info = machine_info()
    shape = "1D, CLI defaults" if args.dims == 1 else "2D, 11 x 11 grid over [-0.3, 0.3]"
    header = (
        f"## Screen first or generate every prompt: the testbed's landscape ({shape})\n\n"
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), torch {info['torch']}; "
        f"variants run one after the other. Command: `python benchmarks/landscape_signals.py"
        f"{' --dims 2' if args.dims == 2 else ''}{' --with-previous' if args.with_previous else ''}"
        f"{' --reuse ' + ' '.join(args.reuse) if args.reuse else ''}` (a reused variant keeps "
        "the file and wall time of its earlier run: see its start)"
    )
    footer = (
        "Wall time of the whole `safety-guard landscape` command (model load, reference "
        "answers, every point, the file). `points`: the distinct points measured (θ₀ once). "
        "`screened first`: points measured by the screen "
        "first; the others generated every prompt. `largest Δ unsafe there`: the largest "
        "difference in unsafe answers from the generate variant at the points both measured "
        "(an adaptive search may measure different points when a verdict differs). `screen "
        "missed / checked`: unsafe answers among the screen's refusals that were generated."
    )
    print(write_table(rows, args.output_dir, f"landscape_signals_{args.dims}d", header, footer))


if __name__ == "__main__":
    main()
