"""What the guard costs a finetune: step time with and without it, at the default cadence.

Trains the aligned testbed with TRL's SFTTrainer (benign data, ``--method`` LoRA r = 8 on all
linear layers by default) for ``--steps`` optimizer steps twice: without the guard, and with
``SafetyGuardCallback`` at its default cadence (``GuardConfig()``: cheap check and probe every 5
steps). Step times exclude the guard (a timer callback runs first); the guard's own time is
reported per cheap check and per probe, and amortized over the steps between two calls.

    python benchmarks/guard_overhead.py                  # LoRA, 30 steps (~5 min on 2 cores)
    python benchmarks/guard_overhead.py --method full

Output: a markdown table on stdout and ``benchmarks/results/guard_overhead_<method>.{md,csv}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, write_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--landscape",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "guard_runs" / "landscape.json",
        help="Testbed landscape for the guard (computed there if missing).",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path(__file__).resolve().parent / "results"
    )
    args = parser.parse_args(argv)

    from safety_guard.demo import FinetuneRun, run_finetune, testbed_landscape
    from safety_guard.guard import GuardConfig
    from safety_guard.testbed import load_testbed

    model, tokenizer = load_testbed(progress=False)
    land = testbed_landscape(args.landscape, model, tokenizer)
    del model
    lr = 2e-4 if args.method == "lora" else 2e-5
    config = GuardConfig()
    results = {}
    with tempfile.TemporaryDirectory(prefix="sg-overhead-") as tmp:
        for guarded in (False, True):
            run = FinetuneRun(
                kind="benign",
                method=args.method,
                learning_rate=lr,
                max_steps=args.steps,
                guarded=guarded,
                guard=config,
            )
            name = "guarded" if guarded else "unguarded"
            results[name] = run_finetune(run, Path(tmp) / name, land, progress=False)
            print(f"[{name}] {results[name]['seconds']:.1f} s", flush=True)

    base, guarded = results["unguarded"], results["guarded"]
    step = base["mean_step_seconds"]
    summary = guarded["guard"]
    check = summary["mean_check_seconds"] or 0.0
    probe = summary["mean_probe_seconds"] or 0.0
    check_pct = 100 * check / (config.check_every * step)
    probe_pct = 100 * probe / (config.probe_every * step)
    rows = [
        {
            "what": "training step, no guard",
            "seconds": f"{step:.3f}",
            "calls": base["steps"],
            "overhead at default cadence %": "",
            "note": "mean optimizer step",
        },
        {
            "what": "training step, guarded run",
            "seconds": f"{guarded['mean_step_seconds']:.3f}",
            "calls": guarded["steps"],
            "overhead at default cadence %": "",
            "note": "mean optimizer step, the guard's own time excluded",
        },
        {
            "what": "cheap check (displacement)",
            "seconds": f"{check:.4f}",
            "calls": summary["checks"],
            "overhead at default cadence %": f"{check_pct:.2f}",
            "note": f"every {config.check_every} steps; goal ≤ 2 %: "
            + ("PASS" if check_pct <= 2 else "FAIL"),
        },
        {
            "what": "probe (current + lookahead 2×, 4×)",
            "seconds": f"{probe:.1f}",
            "calls": summary["probes"],
            "overhead at default cadence %": f"{probe_pct:.0f}",
            "note": f"every {config.probe_every} steps, {config.num_prompts} prompts × "
            f"{1 + len(config.lookahead)} points, {config.max_new_tokens} new tokens",
        },
        {
            "what": "whole run, guarded / unguarded",
            "seconds": f"{guarded['seconds']:.1f} / {base['seconds']:.1f}",
            "calls": "",
            "overhead at default cadence %": f"{100 * (guarded['seconds'] / base['seconds'] - 1):.0f}",
            "note": "wall time of trainer.train()",
        },
    ]
    info = machine_info()
    header = (
        f"## Guard overhead: testbed {args.method} finetune, {args.steps} steps, default cadence\n\n"
        f"Benign data, lr {lr:g}, batch 4, `GuardConfig()` defaults. Machine: {info['nproc']} "
        f"CPUs ({info['cpu']}), torch {info['torch']}.\n\nCommand: `python "
        f"benchmarks/guard_overhead.py --method {args.method} --steps {args.steps}`"
    )
    footer = (
        "Overhead at default cadence = the call's time / (steps between calls × mean step time). "
        "The probe's share depends on the machine and model: it decodes 3 × num_prompts short "
        "answers, while a training step's cost grows with the batch and the sequence length."
    )
    text = write_table(rows, args.output_dir, f"guard_overhead_{args.method}", header, footer)
    print(text)


if __name__ == "__main__":
    main()
