"""How the costs of safety-guard grow with model size: ~10M, ~100M and ~1B parameters.

Llama-shaped models with random float32 weights are built from configs with
:func:`_common.build_llama` (12 attention heads, 4 KV heads, vocab 32000, untied embeddings; the
hidden size must therefore be a multiple of 12):

======  ======  ======  ============  ===========
size    layers  hidden  intermediate  parameters
======  ======  ======  ============  ===========
10m     4       144     384           ~10.1M
100m    8       768     2048          ~99.5M (the model of ``landscape_cost.py``)
1b      15      2304    6144          ~1.0B (~3.7 GiB of float32)
======  ======  ======  ============  ===========

Every (size, job) runs in a FRESH subprocess, one at a time, so that peak RSS is clean:

* ``moves``: ``WeightPerturbation(model, [RandomDirection(0)], offload="cpu")``; ``--repeats``
  × (``apply(α)`` then ``restore()``), seconds per apply and per restore (median);
* ``probe``: one landscape point: ``SafetyProbe(model, tokenizer, ProbeConfig(num_harmful=16,
  num_benign=4, max_new_tokens=24))``, ``prepare()`` (not timed), then ``evaluate()``: seconds
  and decoded tokens. A random model never refuses, so the keyword judge's early stop never
  fires and every response is decoded to the full 24 tokens (16 × 24 = 384 at most);
* ``full-check``: the guard's cheap check for full finetuning: ``FullFinetuneTracker.from_model``
  (the θ₀ copy: seconds and extra RSS), small Gaussian noise added to every weight, then
  ``displacement(model)``: median seconds of ``--check-repeats`` after one untimed warm-up;
* ``lora-check``: the cheap check for LoRA: ``peft.get_peft_model(model, LoraConfig(r=8,
  target_modules="all-linear"))``, lora_B randomized, ``LoraTracker(peft_model)`` then
  ``displacement(peft_model)``: median seconds of ``--check-repeats`` after one warm-up. On a
  loaded machine torch's 2 intra-op threads can stall for 0.1–1 s on these tiny ops (a thread
  descheduled by a higher-priority job), so the note gives the minimum too.

The child records RSS after imports + tokenizer (baseline), after building the model
(model-loaded), the lifetime peak (``ru_maxrss``) and the peak during the job only (VmHWM reset
after the model is built). The 1-minute load average is printed at the start and the end of
every job: the machine is shared, so read wall times with it.

Usage:
    nice -n 10 python benchmarks/scaling.py                       # all sizes, all jobs
    nice -n 10 python benchmarks/scaling.py --sizes 10m 100m --jobs moves probe

Results: ``scaling.{md,csv}`` in ``--output-dir`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
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
    reset_peak_rss,
    rss_bytes,
    run_in_subprocess,
    window_peak_rss_bytes,
    write_table,
)

#: size -> (num_layers, hidden, intermediate); vocab 32000, 12 heads / 4 KV heads (build_llama).
SIZES: dict[str, tuple[int, int, int]] = {
    "10m": (4, 144, 384),
    "100m": (8, 768, 2048),
    "1b": (15, 2304, 6144),
}
JOBS = ("moves", "probe", "full-check", "lora-check")
VOCAB = 32000
NOISE_NOTE = (
    "Timings are wall-clock on a shared 2-core machine where other heavy jobs (training runs, "
    "at higher priority) ran at the same time and this benchmark ran under `nice -n 10`: treat "
    "them as noisy and read them next to the load column; memory figures are stable."
)


def load1() -> float:
    return os.getloadavg()[0]


# -- child ----------------------------------------------------------------------------------------


def _job_moves(model: Any, repeats: int) -> list[dict[str, Any]]:
    from safety_guard.landscape.directions import RandomDirection
    from safety_guard.landscape.perturb import WeightPerturbation

    applies, restores = [], []
    start = time.perf_counter()
    with WeightPerturbation(model, [RandomDirection(seed=0)], offload="cpu") as move:
        save_s = time.perf_counter() - start
        saved = move.saved_bytes
        for i in range(repeats):
            t0 = time.perf_counter()
            move.apply(0.1 * (1 + i))
            t1 = time.perf_counter()
            move.restore()
            t2 = time.perf_counter()
            applies.append(t1 - t0)
            restores.append(t2 - t1)
    note = f"median of {repeats}; save (θ₀ copy, {saved / MIB:.0f} MiB) took {save_s:.2f} s"
    return [
        {"job": "apply (offload cpu)", "seconds": statistics.median(applies), "note": note},
        {"job": "restore (offload cpu)", "seconds": statistics.median(restores), "note": note},
    ]


def _job_probe(model: Any, tokenizer: Any) -> list[dict[str, Any]]:
    from safety_guard.measure.probe import ProbeConfig, SafetyProbe

    probe = SafetyProbe(
        model, tokenizer, ProbeConfig(num_harmful=16, num_benign=4, max_new_tokens=24)
    )
    t0 = time.perf_counter()
    probe.prepare()
    prepare_s = time.perf_counter() - t0
    result = probe.evaluate()
    note = (
        f"{result.decoded_tokens} decoded tokens (max 16×24 = 384), "
        f"{result.decoded_tokens / result.seconds:.1f} tok/s, ASR {result.asr:.0f} %; "
        f"incl. capability NLL of 4 benign answers; prepare() took {prepare_s:.1f} s"
    )
    return [
        {
            "job": "landscape point (evaluate)",
            "seconds": result.seconds,
            "decoded_tokens": result.decoded_tokens,
            "note": note,
        }
    ]


def _job_full_check(model: Any, repeats: int) -> list[dict[str, Any]]:
    import torch

    from safety_guard.guard.displacement import FullFinetuneTracker

    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    tracker = FullFinetuneTracker.from_model(model)
    snapshot_s = time.perf_counter() - t0
    gc.collect()
    copy_rss = rss_bytes() - before
    copy_bytes = sum(t.numel() * t.element_size() for t in tracker.origin.values())
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():  # a small "finetune": relative noise of ~1e-3
        p.add_(torch.randn(p.shape, generator=gen), alpha=1e-3 * float(p.detach().std()))
    value = tracker.displacement(model)  # warm-up, not timed
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        value = tracker.displacement(model)
        times.append(time.perf_counter() - t)
    note = (
        f"median of {repeats} after 1 warm-up (min {min(times):.4f} s); displacement {value:.2e}; from_model() took {snapshot_s:.2f} s; "
        f"θ₀ copy {copy_bytes / MIB:.0f} MiB, RSS +{copy_rss / MIB:.0f} MiB"
    )
    return [
        {
            "job": "cheap check, full (displacement)",
            "seconds": statistics.median(times),
            "theta0_copy_mib": round(copy_rss / MIB, 1),
            "note": note,
        }
    ]


def _job_lora_check(model: Any, repeats: int) -> list[dict[str, Any]]:
    import torch
    from peft import LoraConfig, get_peft_model

    from safety_guard.guard.displacement import LoraTracker

    gc.collect()
    before = rss_bytes()
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    lora_params = 0
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            lora_params += p.numel()
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    gc.collect()
    adapter_rss = rss_bytes() - before
    t0 = time.perf_counter()
    tracker = LoraTracker(peft_model)
    init_s = time.perf_counter() - t0
    value = tracker.displacement(peft_model)  # warm-up, not timed
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        value = tracker.displacement(peft_model)
        times.append(time.perf_counter() - t)
    note = (
        f"median of {repeats} after 1 warm-up (min {min(times):.4f} s); displacement {value:.2e}; {lora_params:,} LoRA params "
        f"(RSS +{adapter_rss / MIB:.0f} MiB); LoraTracker() (base-weight norms) took {init_s:.2f} s"
    )
    return [
        {
            "job": "cheap check, LoRA (displacement)",
            "seconds": statistics.median(times),
            "note": note,
        }
    ]


def run_child(size: str, job: str, repeats: int, check_repeats: int, result_file: Path) -> None:
    """Run one (size, job) in this fresh process and write its rows as JSON."""
    import torch

    torch.set_grad_enabled(False)
    load_start = load1()
    tokenizer = build_tokenizer()
    gc.collect()
    baseline = rss_bytes()
    layers, hidden, intermediate = SIZES[size]
    t0 = time.perf_counter()
    model = build_llama(
        num_layers=layers, hidden=hidden, intermediate=intermediate, vocab_size=VOCAB
    )
    build_s = time.perf_counter() - t0
    gc.collect()
    model_rss = rss_bytes()
    stats = parameter_stats(model)
    window_reset = reset_peak_rss()

    if job == "moves":
        rows = _job_moves(model, repeats)
    elif job == "probe":
        rows = _job_probe(model, tokenizer)
    elif job == "full-check":
        rows = _job_full_check(model, check_repeats)
    else:
        rows = _job_lora_check(model, check_repeats)

    common = {
        "size": size,
        "shape": f"L{layers} h{hidden} i{intermediate}",
        **stats,
        "build_s": build_s,
        "baseline_rss": baseline,
        "model_rss": model_rss,
        "peak_rss": max_rss_bytes(),
        "job_window_peak_rss": window_peak_rss_bytes() if window_reset else None,
        "load_start": load_start,
        "load_end": load1(),
    }
    result_file.write_text(json.dumps([{**common, **r} for r in rows]), encoding="utf-8")


# -- parent ---------------------------------------------------------------------------------------


def _ratio(value: float, ref: float | None) -> str:
    if not ref:
        return "n/a"
    return f"×{value / ref:.3g}"


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by job, sizes in order, with growth against the smallest size measured."""
    order = {s: i for i, s in enumerate(SIZES)}
    job_names: list[str] = []
    for r in results:
        if r["job"] not in job_names:
            job_names.append(r["job"])
    rows = []
    for job in job_names:
        group = sorted((r for r in results if r["job"] == job), key=lambda r: order[r["size"]])
        ref = group[0]
        for r in group:
            growth = r["peak_rss"] - r["baseline_rss"]
            ref_growth = ref["peak_rss"] - ref["baseline_rss"]
            window = r.get("job_window_peak_rss")
            job_extra = (window - r["model_rss"]) / MIB if window else float("nan")
            rows.append(
                {
                    "job": job,
                    "size": r["size"],
                    "params": f"{r['params']:,}",
                    "weights MiB": round(r["weight_bytes"] / MIB, 1),
                    "seconds": round(r["seconds"], 4),
                    "s growth (vs " + ref["size"] + ")": _ratio(r["seconds"], ref["seconds"]),
                    "params growth": _ratio(r["params"], ref["params"]),
                    "decoded tokens": r.get("decoded_tokens", ""),
                    "peak RSS MiB": round(r["peak_rss"] / MIB, 1),
                    "peak-baseline MiB": round(growth / MIB, 1),
                    "peak-baseline growth": _ratio(growth, ref_growth),
                    "job extra over model MiB": round(job_extra, 1),
                    "load 1m (start→end)": f"{r['load_start']:.2f}→{r['load_end']:.2f}",
                    "note": r["note"],
                }
            )
    return rows


def run_all(args: argparse.Namespace) -> str:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sg-scaling-") as tmp:
        for size in args.sizes:
            for job in args.jobs:
                result_file = Path(tmp) / f"{size}-{job}.json"
                child_args = ["--child-size", size, "--child-job", job]
                child_args += ["--repeats", str(args.repeats)]
                child_args += ["--check-repeats", str(args.check_repeats)]
                print(
                    f"[scaling] {size} {job}: fresh subprocess (load {load1():.2f}) ...", flush=True
                )
                start = time.perf_counter()
                rows = run_in_subprocess(
                    __file__, child_args, result_file, f"scaling {size} {job}", args.child_timeout
                )
                wall = time.perf_counter() - start
                if rows is None:
                    continue
                for r in rows:
                    print(
                        f"[scaling] {size} {r['job']}: {r['seconds']:.4f} s, peak RSS "
                        f"{r['peak_rss'] / MIB:.0f} MiB, load {r['load_start']:.2f}→"
                        f"{r['load_end']:.2f} (child wall {wall:.0f} s, model build "
                        f"{r['build_s']:.1f} s) | {r['note']}",
                        flush=True,
                    )
                results.extend(rows)

    rows = table_rows(results)
    info = machine_info()
    loads = [x for r in results for x in (r["load_start"], r["load_end"])]
    load_range = f"{min(loads):.2f}–{max(loads):.2f}" if loads else "n/a"
    shapes = "; ".join(
        f"{s}: {SIZES[s][0]} layers, hidden {SIZES[s][1]}, intermediate {SIZES[s][2]}"
        for s in args.sizes
    )
    header = (
        "## Scaling: costs of weight moves, a landscape point and the guard's cheap check vs "
        "model size\n\n"
        f"Llama-shaped, random float32 weights, vocab {VOCAB}, untied, 12 heads / 4 KV heads "
        f"({shapes}). Machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram']} RAM, torch "
        f"{info['torch']} ({info['torch_threads']} threads), transformers {info['transformers']}, "
        f"Python {info['python']}; 1-minute load average {load_range} during the runs.\n\n"
        f"{NOISE_NOTE}"
    )
    footer = (
        "One fresh subprocess per (size, job); apply and restore share one. Baseline = RSS after "
        "imports and the tokenizer; peak = `ru_maxrss` of the child (includes building the "
        "model); job extra = VmHWM during the job minus RSS once the model was built. Growth = "
        "ratio to the smallest size's row of the same job, next to the ratio of parameter "
        "counts. The landscape point decodes every response to 24 tokens: a random model never "
        "refuses, so the keyword judge's early stop never fires."
    )
    return write_table(rows, args.output_dir, "scaling", header, footer)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    parser.add_argument("--repeats", type=int, default=3, help="apply+restore pairs (median).")
    parser.add_argument(
        "--check-repeats", type=int, default=5, help="displacement() calls (median)."
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="Where scaling.md and scaling.csv go (default: benchmarks/results/).",
    )
    parser.add_argument("--child-timeout", type=float, default=1800, help="Seconds per child.")
    parser.add_argument("--child-size", choices=list(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--child-job", choices=JOBS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_job:
        run_child(
            args.child_size, args.child_job, args.repeats, args.check_repeats, args.result_file
        )
        return
    text = run_all(args)
    print()
    print(text)
    print(f"Tables written to {args.output_dir}/")


if __name__ == "__main__":
    main()
