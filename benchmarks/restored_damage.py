"""What a halt leaves the user: the held-out damage of the adapter the guard puts back.

With LoRA and ``restore_on_halt`` (the default) a halt loads back the adapter of the last probe
that found the run within the promise. For every recorded LoRA run of ``guard_runs.py`` that
``GuardConfig()`` halts in the replay, this script trains the run again, unguarded, with the
same data, seed and learning-rate schedule, up to that probe's step; checks that it reached the
recorded weights (its displacement, at a recorded step, within 1e-4 of the recording's: runs
recorded with other library versions differ by float rounding); and measures the keyword ASR
of that adapter on the 100 held-out harmful prompts (generation, 24 tokens), minus the
aligned model's. A halt whose last safe probe is step 0 leaves the aligned model itself
(damage 0 by definition, nothing trained).

    python benchmarks/restored_damage.py                       # every recorded halting LoRA run
    python benchmarks/restored_damage.py --runs benchmarks/results/guard_schedules

Writes ``restored.json`` into each run's folder (read by ``guard_runs.py``'s tables, column
"damage left after the halt") and a table to ``benchmarks/results/restored_damage.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_info, markdown_table
from guard_runs import classify, last_safe_step, replay, reproduced

from safety_guard.guard import GuardConfig

RESULTS = Path(__file__).resolve().parent / "results"


def restored_step(result: dict[str, Any], config: GuardConfig) -> tuple[int | None, int]:
    """(the replayed halt step, the step of the last probe within the promise before it)."""
    rep = replay(result, config)
    return rep["halt"], last_safe_step(rep)


def measure(result: dict[str, Any], step: int) -> dict[str, Any]:
    """Train the run again up to ``step`` and measure its held-out ASR there."""
    from transformers import TrainerCallback

    from safety_guard.guard.displacement import make_tracker
    from safety_guard.testbed.finetune import FinetuneRun, run_finetune

    run = result["run"]

    class StopAt(TrainerCallback):
        """Stop after ``step`` steps; note the displacement there."""

        def on_train_begin(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
            self.tracker = make_tracker(model)

        def on_step_end(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
            if state.global_step >= step:
                self.displacement = self.tracker.displacement(model)
                control.should_training_stop = True

    stop = StopAt()
    again = FinetuneRun(
        kind=run["kind"],
        method=run["method"],
        learning_rate=run["learning_rate"],
        max_steps=run["max_steps"],  # the schedule of the whole run, stopped early
        batch_size=run.get("batch_size", 4),
        lr_scheduler_type=run.get("lr_scheduler_type", "constant"),
        warmup_ratio=run.get("warmup_ratio", 0.0),
        guarded=False,
        seed=run["seed"],
    )
    with tempfile.TemporaryDirectory() as scratch:  # the trainer's folder: nothing kept
        out = run_finetune(again, scratch, None, progress=False, callbacks=[stop])
    recorded = {r["step"]: r["displacement"] for r in result["records"]}.get(step)
    return {
        "step": step,
        "heldout_asr": out["final_heldout_asr"],
        "displacement": stop.displacement,
        "recorded_displacement": recorded,
        "seconds": out["seconds"],
    }


def _difference(done: dict[str, Any]) -> str:
    """The retrained displacement's relative difference from the recording's, and whether that
    is the same weights (:func:`guard_runs.reproduced`); "-" for a step not recorded."""
    same = reproduced(done)
    if same is None:
        return "-"
    relative = done["displacement"] / done["recorded_displacement"] - 1.0
    return f"{relative:+.1e} ({'same' if same else 'NOT the same'})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs",
        type=Path,
        nargs="+",
        default=[RESULTS / "guard_damage", RESULTS / "guard_schedules"],
        help="Folders of recorded runs (guard_runs.py --output-dir).",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "restored_damage.md")
    args = parser.parse_args()
    config = GuardConfig()
    rows = []
    for base in args.runs:
        for path in sorted(base.glob("*-lora-*/result.json")):
            result = json.loads(path.read_text())
            halt, step = restored_step(result, config)
            if halt is None:
                continue
            folder = path.parent
            aligned = result["curve"][0][1]
            saved = folder / "restored.json"
            done = json.loads(saved.read_text()) if saved.exists() else None
            if done is None or done.get("step") != step:
                if step == 0:
                    done = {"step": 0, "heldout_asr": aligned, "displacement": 0.0}
                else:
                    done = measure(result, step)
                saved.write_text(json.dumps(done, indent=1))
                print(f"{folder.name}: step {step}, held-out ASR {done['heldout_asr']:.1f}")
            _, over20, _ = classify(result["curve"])
            before = [a for s, a in result["curve"] if s <= halt]
            rows.append(
                {
                    "run": folder.name,
                    "halt step": halt,
                    "damage at last eval ≤ halt": f"{before[-1] - aligned:.0f}",
                    "adapter put back (step)": step,
                    "its held-out damage (points)": f"{done['heldout_asr'] - aligned:.0f}",
                    "the recording's, same step": next(
                        (f"{a - aligned:.0f}" for s, a in result["curve"] if s == step), "-"
                    ),
                    "displacement against the recording's": _difference(done),
                    "damage >20 at": over20 or "never",
                }
            )
    info = machine_info()
    text = (
        "## The adapter a halt leaves: held-out damage with `restore_on_halt`\n\n"
        f"`GuardConfig()` replayed on the recorded LoRA runs; each halting run trained again up to "
        f"the adapter the halt puts back. Machine: {info['nproc']} CPUs ({info['cpu']}), torch "
        f"{info['torch']}.\n\n" + markdown_table(rows) + "\n"
    )
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
