"""What the guard costs a finetune: the whole run's wall time with and without it.

Trains the aligned testbed with TRL's SFTTrainer (benign data, ``--method`` LoRA r = 8 on all
linear layers by default) for ``--steps`` optimizer steps twice: without the guard, and with
``SafetyGuardCallback`` at its defaults (``GuardConfig()``: cheap check every step, forward-only
probes on the adaptive cadence, 200 probe prompts). The guard's own time is split into its setup
at train begin (the aligned model's baseline), its cheap checks and its probes.

    python benchmarks/guard_overhead.py --steps 200              # LoRA (~25 min on 2 cores)
    python benchmarks/guard_overhead.py --steps 200 --method full
    python benchmarks/guard_overhead.py --steps 30
    python benchmarks/guard_overhead.py --kind varied --lr 1e-4 --lr-scheduler linear

Output: a markdown table on stdout, ``benchmarks/results/guard_overhead_<method>_<steps>.{md,csv}``
and the guarded run's trajectory (``….trajectory.jsonl``: every probe's states, prompts scored,
seconds).
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--kind",
        choices=["benign", "varied"],
        default="benign",
        help="Benign data: the suite's 100 requests, or 160 varied everyday requests.",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="Peak learning rate (default: 2e-4 LoRA, 1e-5 full)."
    )
    parser.add_argument(
        "--lr-scheduler",
        default="constant",
        help="The Trainer's lr_scheduler_type (constant, linear, cosine, ...).",
    )
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument(
        "--landscape",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "testbed_landscape.json",
        help="Testbed landscape for the guard (computed there if missing).",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path(__file__).resolve().parent / "results"
    )
    args = parser.parse_args(argv)

    from safety_guard.guard import GuardConfig
    from safety_guard.testbed import load_testbed
    from safety_guard.testbed.finetune import FinetuneRun, run_finetune, testbed_landscape

    model, tokenizer = load_testbed(progress=False)
    land = testbed_landscape(args.landscape, model, tokenizer)
    del model
    lr = args.lr or (2e-4 if args.method == "lora" else 1e-5)
    config = GuardConfig()
    results = {}
    with tempfile.TemporaryDirectory(prefix="sg-overhead-") as tmp:
        for guarded in (False, True):
            run = FinetuneRun(
                kind=args.kind,
                method=args.method,
                learning_rate=lr,
                max_steps=args.steps,
                lr_scheduler_type=args.lr_scheduler,
                warmup_ratio=args.warmup_ratio,
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
    # a guarded run that halted trained fewer steps: compare the time per step then
    halted = guarded["steps"] < base["steps"]
    ratio = (guarded["seconds"] / max(guarded["steps"], 1)) / (base["seconds"] / base["steps"])
    # the same ratio within the guarded run: its wall time against that time less the guard's
    # own (all its hooks); both sides see the same machine, minute by minute, which the two
    # runs one after the other do not (this machine's speed drifted by 25 % within an hour)
    own = summary.get("total_seconds") or 0.0
    in_run = guarded["seconds"] / max(guarded["seconds"] - own, 1e-9)
    rows = [
        {
            "what": "training step, no guard",
            "seconds": f"{step:.3f}",
            "calls": base["steps"],
            "share of the unguarded run %": "",
            "note": "mean optimizer step",
        },
        {
            "what": "guard setup at train begin",
            "seconds": f"{summary['setup_seconds']:.1f}",
            "calls": 1,
            "share of the unguarded run %": f"{100 * summary['setup_seconds'] / base['seconds']:.1f}",
            "note": "the aligned model's baseline: reused from the landscape file when it "
            "was recorded there with the same settings, else the refusal openings of the first "
            f"{config.min_prompts} of {summary['num_prompts']} probe prompts (more, and the "
            "capability references, when a probe needs them)",
        },
        {
            "what": "cheap check (displacement, direction)",
            "seconds": f"{check:.4f}",
            "calls": summary["checks"],
            "share of the unguarded run %": f"{100 * check * summary['checks'] / base['seconds']:.2f}",
            "note": "every step",
        },
        {
            "what": "probes (θ₀ + 2·δ forward-only, capped at the horizon near the end; the "
            "current model and a sample of flagged prompts judged by generation when the "
            "decision is not ok)",
            "seconds": f"{summary['total_probe_seconds']:.1f}",
            "calls": summary["probes"],
            "share of the unguarded run %": f"{100 * summary['total_probe_seconds'] / base['seconds']:.1f}",
            "note": "probe steps: "
            + ", ".join(str(r["step"]) for r in guarded["trajectory"] if r["event"] == "probe"),
        },
        {
            "what": "sentinel (16 prompts nearest to flipping, at the last probe's lookahead "
            "point, between probes)",
            "seconds": f"{summary.get('total_sentinel_seconds', 0.0):.1f}",
            "calls": summary.get("sentinels", 0),
            "share of the unguarded run %": f"{100 * summary.get('total_sentinel_seconds', 0.0) / base['seconds']:.1f}",
            "note": "sentinel steps: "
            + ", ".join(str(r["step"]) for r in guarded["trajectory"] if "sentinel" in r),
        },
        {
            "what": "whole run, guarded / unguarded",
            "seconds": f"{guarded['seconds']:.1f} / {base['seconds']:.1f}",
            "calls": "",
            "share of the unguarded run %": f"{100 * (ratio - 1):.1f}",
            "note": (
                f"halted at step {guarded['steps']}: ratio of the time per step {ratio:.3f}"
                if halted
                else f"ratio {ratio:.3f} (goal ≤ 1.10 at 200 steps): wall time of trainer.train()"
            ),
        },
        {
            "what": "guarded run, with / without the guard's own time",
            "seconds": f"{guarded['seconds']:.1f} / {guarded['seconds'] - own:.1f}",
            "calls": "",
            "share of the unguarded run %": f"{100 * (in_run - 1):.1f}",
            "note": f"ratio {in_run:.3f}: the guard's hooks took {own:.1f} s of the guarded "
            "run (setup, checks, probes, sentinel, files); the same machine minute by minute",
        },
        {
            "what": "held-out ASR at the end, unguarded / guarded %",
            "seconds": "",
            "calls": "",
            "share of the unguarded run %": "",
            "note": f"{base['final_heldout_asr']:.0f} / {guarded['final_heldout_asr']:.0f} "
            "(100 held-out prompts, generation, keyword judge; the aligned testbed: 5; the "
            "guarded model is the one the trainer holds at its end)",
        },
    ]
    info = machine_info()
    header = (
        f"## Guard overhead: testbed {args.method} finetune, {args.steps} steps, `GuardConfig()`\n\n"
        f"Benign data ({args.kind}), lr {lr:g} ({args.lr_scheduler}, warmup ratio {args.warmup_ratio:g}), "
        f"batch 4, `GuardConfig()` defaults. Machine: {info['nproc']} CPUs ({info['cpu']}), "
        f"torch {info['torch']}.\n\nCommand: `python benchmarks/guard_overhead.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`"
    )
    footer = (
        "Share of the unguarded run = the guard's time / the unguarded run's wall time. The "
        "guarded run's own steps may differ slightly in time (noise of a shared machine)."
    )
    name = f"guard_overhead_{args.method}_{args.steps}" + (
        f"_{args.kind}" if args.kind != "benign" else ""
    )
    if args.lr_scheduler != "constant" or args.warmup_ratio or args.lr:
        name += f"_{args.lr_scheduler}_lr{lr:g}" + (
            f"_warmup{args.warmup_ratio:g}" if args.warmup_ratio else ""
        )
    trajectory = args.output_dir / f"{name}.trajectory.jsonl"
    trajectory.write_text("".join(json.dumps(r) + "\n" for r in guarded["trajectory"]))
    text = write_table(rows, args.output_dir, name, header, footer)
    print(text)


if __name__ == "__main__":
    main()
