"""Guarded finetunes of the testbed: the README's main job, the examples and the guard benchmark.

``run_finetune`` trains the aligned testbed with TRL's ``SFTTrainer`` (LoRA r = 8 on all linear
layers, or full finetuning) on harmful-compliance data (harmful ``attack`` requests → compliant
openings, no harmful content) or benign data (benign ``finetune`` requests → the model's own
answers), optionally guarded by :class:`~safety_guard.guard.SafetyGuardCallback`, and measures
the keyword ASR on the *full* held-out harmful set at the end (and, with ``eval_every``, along
the way, for unguarded reference curves).

Example:
    $ safety-guard demo --output-dir outputs/demo      # guarded harmful + benign LoRA finetunes
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import TrainerCallback

from .generation import generate_responses
from .guard import GuardConfig, SafetyGuardCallback
from .judges import KeywordJudge
from .landscape import Landscape, LandscapeConfig, compute_landscape
from .probe import ProbeConfig
from .prompts import load_prompts

__all__ = ["FinetuneRun", "heldout_asr", "run_finetune", "testbed_landscape"]

logger = logging.getLogger(__name__)


def heldout_asr(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int = 24) -> float:
    """Keyword ASR (%) on the full held-out harmful set (100 prompts)."""
    prompts = list(load_prompts("builtin:harmful"))
    judge = KeywordJudge()
    gen = generate_responses(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=25,
        stop_when_decided=judge.is_decided,
    )
    return 100.0 * sum(judge(prompts, gen.responses)) / len(prompts)


def testbed_landscape(path: str | Path, model: torch.nn.Module, tokenizer: Any) -> Landscape:
    """The testbed's landscape for the guard (2 random directions, adaptive, 40 probe prompts)."""
    path = Path(path)
    if path.exists():
        land = Landscape.load(path)
        if land.complete:
            return land
    return compute_landscape(
        model,
        tokenizer,
        LandscapeConfig(num_directions=2, search="adaptive"),
        ProbeConfig(num_harmful=40, num_benign=8),
        output=path,
    )


@dataclass
class FinetuneRun:
    """One finetune of the testbed."""

    kind: Literal["harmful", "benign"] = "harmful"
    method: Literal["lora", "full"] = "lora"
    learning_rate: float = 2e-4
    max_steps: int = 60
    batch_size: int = 4
    guarded: bool = True
    guard: GuardConfig = field(default_factory=GuardConfig)
    eval_every: int | None = field(
        default=None, metadata={"help": "Measure full held-out ASR every N steps (slow)."}
    )
    seed: int = 0


class _StepTimer(TrainerCallback):
    """Wall time of each optimizer step (first in the callback list: excludes other callbacks)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.seconds.append(time.perf_counter() - self._start)


class _HeldoutCurve(TrainerCallback):
    """Full held-out ASR every ``every`` steps (for unguarded reference runs)."""

    def __init__(self, tokenizer: Any, every: int) -> None:
        self.tokenizer, self.every = tokenizer, every
        self.curve: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step % self.every == 0:
            self.curve.append((state.global_step, heldout_asr(kwargs["model"], self.tokenizer)))


def run_finetune(
    run: FinetuneRun,
    output_dir: str | Path,
    landscape: Landscape | str | Path | None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the testbed as ``run`` says and report what happened (and what the guard did)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from .testbed import benign_finetune_dataset, harmful_finetune_dataset, load_testbed

    output_dir = Path(output_dir)
    model, tokenizer = load_testbed(progress=progress)
    if run.kind == "harmful":
        data = harmful_finetune_dataset(n=100, seed=run.seed)
    else:
        data = benign_finetune_dataset(model, tokenizer, n=100)
    data = Dataset.from_list(
        [{"prompt": m["messages"][:-1], "completion": m["messages"][-1:]} for m in data]
    )
    timer = _StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    guard = None
    if run.guarded:
        guard = SafetyGuardCallback(landscape, run.guard, tokenizer=tokenizer)
        callbacks.append(guard)
    curve = _HeldoutCurve(tokenizer, run.eval_every) if run.eval_every else None
    if curve is not None:
        callbacks.append(curve)
    config = SFTConfig(
        output_dir=str(output_dir),
        max_steps=run.max_steps,
        learning_rate=run.learning_rate,
        per_device_train_batch_size=run.batch_size,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        completion_only_loss=True,
        max_length=256,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        seed=run.seed,
        disable_tqdm=not progress,
    )
    peft_config = (
        LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        if run.method == "lora"
        else None
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    final_asr = heldout_asr(trainer.model, tokenizer)
    result = {
        "run": {k: v for k, v in asdict(run).items() if k != "guard"},
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "mean_step_seconds": sum(timer.seconds) / max(len(timer.seconds), 1),
        "final_heldout_asr": final_asr,
        "guard": guard.summary() if guard else None,
        "trajectory": guard.records if guard else None,
        "curve": curve.curve if curve else None,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    del trainer, model
    gc.collect()
    return result


def describe(result: dict[str, Any]) -> str:
    """A few lines on what the guard saw and did in one run."""
    run = result["run"]
    head = (
        f"{run['kind']} {run['method']} finetune, lr {run['learning_rate']:g}, "
        f"{result['steps']}/{run['max_steps']} steps in {result['seconds']:.0f} s"
    )
    guard = result["guard"]
    lines = [head]
    if guard:
        final = guard.get("final") or {}
        if guard["halt_step"] is not None:
            lines.append(
                f"  guard HALTED at step {guard['halt_step']}: {'; '.join(final.get('reasons', []))}"
            )
        else:
            lines.append(f"  guard let it run ({guard['warn_count']} warning(s))")
        lines.append(
            f"  last probe: ASR {final.get('asr', float('nan')):.1f} %, lookahead {final.get('lookahead')}, "
            f"edge distance {final.get('edge_distance')}, displacement {final.get('displacement', float('nan')):.2e}"
        )
        lines.append(
            f"  probes {guard['probes']}, {guard['mean_probe_seconds'] or 0:.1f} s each; "
            f"cheap check {1000 * (guard['mean_check_seconds'] or 0):.0f} ms"
        )
    lines.append(f"  held-out ASR (100 prompts) at the end: {result['final_heldout_asr']:.1f} %")
    return "\n".join(lines)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="Guarded harmful and benign finetunes of the testbed; prints what the guard did.",
    )
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument(
        "--landscape",
        default=None,
        help="The testbed's landscape file (e.g. from `safety-guard landscape`); default: a "
        "2-direction landscape computed once in --output-dir.",
    )
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=None, help="Default: 2e-4 (LoRA), 2e-5 (full).")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .testbed import load_testbed

    out = Path(args.output_dir)
    model, tokenizer = load_testbed()
    land = (
        Landscape.load(args.landscape)
        if args.landscape
        else testbed_landscape(out / "landscape.json", model, tokenizer)
    )
    land.check_model(model)
    del model
    lr = args.lr or (2e-4 if args.method == "lora" else 2e-5)
    for kind in ("harmful", "benign"):
        result = run_finetune(
            FinetuneRun(kind=kind, method=args.method, learning_rate=lr, max_steps=args.steps),
            out / f"{kind}-{args.method}",
            land,
        )
        print(describe(result), flush=True)
    return 0
