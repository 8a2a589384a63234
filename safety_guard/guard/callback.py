"""``SafetyGuardCallback``: watch a finetune against the aligned model's safety landscape.

Add one line to an existing ``Trainer``/``SFTTrainer`` script::

    trainer = SFTTrainer(..., callbacks=[SafetyGuardCallback(landscape="landscape.json")])

Every ``check_every`` steps the guard logs the layer-normalized displacement δ = θₜ − θ₀ and its
ratio to the landscape's random basin radius (cheap: no generation). Every ``probe_every`` steps
it probes the current model (keyword ASR on held-out harmful prompts, capability NLL) and the
landscape *along the finetuning direction*, θ₀ + s·δ for the lookahead multiples s, locates the
basin edge along that direction and the distance to it, and decides:

* **warn** (``logging`` + ``warnings``) when a lookahead point is outside the basin: its ASR is
  ``lookahead_margin`` points above the aligned model's while capability is intact (a point whose
  capability collapsed emits gibberish, which the keyword judge would miscount as unsafe, and a
  point whose ASR rose by fewer than ``min_asr_per_nll`` points per nat of capability lost is
  degrading in general, as benign finetunes do far along their direction);
* **halt** (``control.should_training_stop``) when the edge is at most ``min_edge_distance``
  multiples of δ ahead, or when the current model's ASR exceeds the aligned ASR by
  ``current_margin`` points.

Metrics go through ``trainer.log()`` under ``safety/`` (TensorBoard, W&B, ...), every event is
appended to ``trajectory.jsonl`` and the run ends with a plot of the trajectory. Under
DDP/torchrun the probe prompts are split across ranks, counts are summed, and the halt flag is
all-reduced, so every rank takes the same decision; only the main process writes files.

**VISAGE along the finetuning direction** (``safety/visage_ft``): the paper's VISAGE computed on
the probed points s ∈ {0, 1, lookahead...} of the line θ₀ + s·δ — the mean of 100 − ASR over the
contiguous points from s = 0 whose ASR is below the landscape's edge ASR, plus the first point
beyond. 100 means every probed point is fully safe; it falls as the line's basin shrinks.

Example:
    >>> cb = SafetyGuardCallback(landscape=None, check_every=5, probe_every=20)  # default: 5 and 5
    >>> cb.config.probe_every
    20
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..basin import visage as visage_score
from ..generation import ChatFormat, generate_responses, sequence_nll
from ..judges import KeywordJudge
from ..landscape import Landscape, LandscapeConfig, compute_landscape
from ..probe import ProbeConfig
from ..prompts import PromptSet, load_prompts
from .config import GuardConfig
from .displacement import FullFinetuneTracker, LoraTracker, make_tracker
from .rule import OK, STATUS_NAMES, WARN, decide

__all__ = ["SafetyGuardCallback", "SafetyGuardWarning"]

logger = logging.getLogger(__name__)


class SafetyGuardWarning(UserWarning):
    """The finetune is approaching the edge of the safety basin."""


# -- distributed helpers --------------------------------------------------------------------------


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    _rank, world = _dist()
    if world == 1:
        return values
    backend = torch.distributed.get_backend()
    dev = device if backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=dev)
    reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor.tolist()


def _broadcast_object(obj: Any) -> Any:
    _rank, world = _dist()
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    _rank, world = _dist()
    if world > 1:
        torch.distributed.barrier()


def _find_trainer() -> Any:
    """The ``Trainer`` running this callback, found on the call stack (when not passed)."""
    import inspect

    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


class SafetyGuardCallback(TrainerCallback):
    """Guard a finetune with the pre-finetune safety landscape; stop it before safety is gone.

    Args:
        landscape: a landscape file (or :class:`~safety_guard.landscape.Landscape`) of the
            model *before* finetuning, checked against the model at train begin. ``None``
            computes a small one (``landscape_directions`` random directions, adaptive search,
            the probe prompts) at train begin and saves it in the guard's folder.
        config: a :class:`GuardConfig`; keyword arguments override its fields.
        trainer: the trainer, for ``trainer.log()`` (found automatically when omitted).
        tokenizer: the tokenizer (default: the trainer's ``processing_class``).
    """

    def __init__(
        self,
        landscape: str | os.PathLike[str] | Landscape | None = None,
        config: GuardConfig | None = None,
        *,
        trainer: Any = None,
        tokenizer: Any = None,
        **overrides: Any,
    ) -> None:
        config = config or GuardConfig()
        if overrides:
            unknown = set(overrides) - {f.name for f in dataclasses.fields(GuardConfig)}
            if unknown:
                raise TypeError(f"Unknown SafetyGuardCallback options: {sorted(unknown)}.")
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self._landscape_source = landscape
        self.landscape: Landscape | None = landscape if isinstance(landscape, Landscape) else None
        if isinstance(landscape, str | os.PathLike):
            self.landscape = Landscape.load(landscape)  # fail fast on a missing/bad file
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.tracker: FullFinetuneTracker | LoraTracker | None = None
        self.harmful: PromptSet | None = None
        self.benign: PromptSet | None = None
        self.reference_answers: list[str] | None = None
        self.judge = KeywordJudge()
        # state that survives checkpoint resume (ExportableState + trajectory file)
        self.last_safe_step: int | None = None
        self.warn_count = 0
        self.halt_step: int | None = None
        self.last_probe: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []
        self.probe_seconds: list[float] = []
        self.check_seconds: list[float] = []
        self._dir: Path | None = None
        self._is_main = True

    # -- ExportableState (transformers >= 4.41) ---------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "args": {"config": self.config.to_dict()},
            "attributes": {
                "last_safe_step": self.last_safe_step,
                "warn_count": self.warn_count,
                "halt_step": self.halt_step,
                "last_probe": self.last_probe,
            },
        }

    # -- setup --------------------------------------------------------------------------------------
    def _guard_dir(self, args: TrainingArguments) -> Path:
        return Path(self.config.output_dir or Path(args.output_dir) / "safety-guard")

    def _probe_config(self) -> ProbeConfig:
        return ProbeConfig(
            harmful=self.config.harmful,
            num_harmful=self.config.num_prompts,
            benign=self.config.benign,
            num_benign=self.config.num_benign,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
            system_prompt=self.config.system_prompt,
        )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model: nn.Module = kwargs["model"]
        self.tokenizer = self.tokenizer or kwargs.get("processing_class") or kwargs.get("tokenizer")
        if self.tokenizer is None:
            raise ValueError(
                "SafetyGuardCallback needs the tokenizer: pass processing_class=tokenizer to the "
                "trainer or tokenizer=... to the callback."
            )
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The tokenizer has no chat template; the guard probes the model as a chat model. "
                "Set tokenizer.chat_template before training."
            )
        self.trainer = self.trainer or _find_trainer()
        if self.trainer is None:
            logger.warning(
                "SafetyGuardCallback could not find the trainer: safety/ metrics go to the "
                "trajectory file only. Pass trainer=... to send them to your loggers."
            )
        self._is_main = state.is_world_process_zero
        self._dir = self._guard_dir(args)
        resumed = state.global_step > 0
        self.harmful = load_prompts(self.config.harmful, limit=self.config.num_prompts)
        self.benign = (
            load_prompts(self.config.benign, limit=self.config.num_benign)
            if self.config.num_benign
            else None
        )
        tracker_is_lora = _is_lora_model(model)
        if self.landscape is None:
            self.landscape = self._compute_landscape(model)
        elif not resumed or tracker_is_lora:
            self.landscape.check_model(model)  # raises LandscapeMismatchError with a clear message
        selection = self.landscape.config.selection
        if resumed and not tracker_is_lora:
            source = self.config.origin or getattr(
                getattr(model, "config", None), "_name_or_path", None
            )
            if not source or not Path(source).is_dir():
                raise ValueError(
                    "Resuming a full finetune: the guard needs the pre-finetune weights. Pass "
                    "GuardConfig(origin=FOLDER) with the model the finetune started from."
                )
            self.tracker = FullFinetuneTracker.from_checkpoint(source, model, selection)
        else:
            self.tracker = make_tracker(model, selection)
        if self.benign is not None:
            # reference answers of the *aligned* model: on resume, go back to θ₀ first
            at_origin = self.tracker.along(model, 0.0) if resumed else contextlib.nullcontext()
            with at_origin:
                self.reference_answers = self._reference_answers(model)
        if resumed:
            self._restore_from_trajectory()
        logger.info(
            "SafetyGuard: %s finetune, aligned ASR %.1f %%, random basin radius %s, probe every %d steps.",
            self.tracker.kind,
            self.aligned_asr,
            f"{self.basin_radius:.4f}" if self.basin_radius else "n/a",
            self.config.probe_every,
        )

    def _compute_landscape(self, model: nn.Module) -> Landscape:
        path = (self._dir or Path(".")) / "landscape.json"
        config = LandscapeConfig(num_directions=self.config.landscape_directions, search="adaptive")
        logger.info(
            "SafetyGuard: no landscape given; computing one for the aligned model -> %s", path
        )
        data = None
        if self._is_main:
            land = compute_landscape(
                model,
                self.tokenizer,
                config,
                self._probe_config(),
                output=path,
                progress=True,
            )
            data = land.data
        data = _broadcast_object(data)
        return Landscape(data)

    def _reference_answers(self, model: nn.Module) -> list[str]:
        gen = generate_responses(
            model,
            self.tokenizer,
            list(self.benign or ()),
            chat_format=ChatFormat(system_prompt=self.config.system_prompt),
            max_new_tokens=32,
            batch_size=self.config.batch_size,
        )
        return [a or "." for a in gen.responses]

    def _restore_from_trajectory(self) -> None:
        path = self._dir / "trajectory.jsonl" if self._dir else None
        if path is None or not path.exists():
            return
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.records.append(record)
            if record.get("event") == "probe":
                self.last_probe = record
                if record.get("status") == "ok":
                    self.last_safe_step = record["step"]
                elif record.get("status") == "warn":
                    self.warn_count += 1

    # -- properties from the landscape ---------------------------------------------------------------
    @property
    def aligned_asr(self) -> float:
        origin = self.landscape.origin if self.landscape else None
        return float(origin["asr"]) if origin else 0.0

    @property
    def aligned_nll(self) -> float | None:
        origin = self.landscape.origin if self.landscape else None
        return origin.get("nll") if origin else None

    @property
    def basin_radius(self) -> float | None:
        try:
            return self.landscape.basin_radius()["mean"] if self.landscape else None
        except ValueError:
            return None

    # -- measurements ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _measure(self, model: nn.Module) -> dict[str, float]:
        """ASR and capability at the model's current weights; prompts split across ranks."""
        rank, world = _dist()
        prompts = list(self.harmful)[rank::world]
        fmt = ChatFormat(system_prompt=self.config.system_prompt)
        unsafe = total = 0
        tokens = 0
        if prompts:
            gen = generate_responses(
                model,
                self.tokenizer,
                prompts,
                chat_format=fmt,
                max_new_tokens=self.config.max_new_tokens,
                batch_size=self.config.batch_size,
                stop_when_decided=getattr(self.judge, "is_decided", None),
            )
            verdicts = self.judge(prompts, gen.responses)
            unsafe, total, tokens = sum(verdicts), len(verdicts), gen.decoded_tokens
        nll_sum = nll_count = 0.0
        if self.benign is not None and self.reference_answers is not None:
            b_prompts = list(self.benign)[rank::world]
            b_answers = self.reference_answers[rank::world]
            if b_prompts:
                nll = sequence_nll(model, self.tokenizer, b_prompts, b_answers, chat_format=fmt)
                nll_sum, nll_count = (nll * len(b_prompts)), float(len(b_prompts))
        device = next(model.parameters()).device
        unsafe, total, tokens, nll_sum, nll_count = _all_reduce(
            [unsafe, total, tokens, nll_sum, nll_count], device
        )
        return {
            "asr": 100.0 * unsafe / max(total, 1),
            "nll": nll_sum / nll_count if nll_count else float("nan"),
            "decoded_tokens": tokens,
        }

    def _probe(self, model: nn.Module, displacement: float) -> dict[str, Any]:
        start = time.perf_counter()
        current = self._measure(model)
        ahead: dict[float, dict[str, float]] = {}
        if displacement > 0:
            for s in self.config.lookahead:
                with self.tracker.along(model, s):
                    ahead[s] = self._measure(model)
        decision = decide(current, ahead, self.config, self.aligned_asr, self.aligned_nll)
        multiples = [1.0, *ahead]
        points = {1.0: current, **ahead}
        edge = decision.edge_multiple
        edge_thr = self.landscape.edge_asr if self.landscape else 100.0
        line_alphas = [0.0, *multiples]
        line_asr = [self.aligned_asr] + [points[s]["asr"] for s in multiples]
        visage_ft = visage_score(line_alphas, line_asr, edge_thr)
        seconds = time.perf_counter() - start
        return {
            "current": current,
            "lookahead": ahead,
            "edge_multiple": edge,
            "edge_distance": decision.edge_distance,
            "edge_found": edge is not None,
            "edge_displacement": (edge or max(multiples)) * displacement,
            "visage_ft": visage_ft,
            "status": decision.status,
            "reasons": decision.reasons,
            "seconds": seconds,
        }

    # -- events ---------------------------------------------------------------------------------------
    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.tracker is None:
            return
        step = state.global_step
        probe_now = step % self.config.probe_every == 0
        check_now = step % self.config.check_every == 0
        if not (probe_now or check_now):
            return
        model: nn.Module = kwargs["model"]
        t0 = time.perf_counter()
        displacement = self.tracker.displacement(model)
        self.check_seconds.append(time.perf_counter() - t0)
        metrics: dict[str, float] = {"safety/displacement": displacement}
        radius = self.basin_radius
        if radius:
            metrics["safety/basin_ratio"] = displacement / radius
        record: dict[str, Any] = {"step": step, "event": "check", "displacement": displacement}
        if probe_now:
            result = self._probe(model, displacement)
            self.probe_seconds.append(result["seconds"])
            status = int(
                _all_reduce([float(result["status"])], next(model.parameters()).device, "max")[0]
            )
            metrics.update(
                {
                    "safety/asr": result["current"]["asr"],
                    "safety/nll": result["current"]["nll"],
                    "safety/asr_aligned": self.aligned_asr,
                    "safety/edge_distance": result["edge_distance"],
                    "safety/edge_displacement": result["edge_displacement"],
                    "safety/visage_ft": result["visage_ft"],
                    "safety/status": float(status),
                    "safety/probe_seconds": result["seconds"],
                }
            )
            with contextlib.suppress(ValueError, AttributeError):
                metrics["safety/visage_aligned"] = self.landscape.visage()["mean"]
            for s, point in result["lookahead"].items():
                metrics[f"safety/lookahead_{s:g}x_asr"] = point["asr"]
                metrics[f"safety/lookahead_{s:g}x_nll"] = point["nll"]
            record.update(
                {
                    "event": "probe",
                    "asr": result["current"]["asr"],
                    "nll": result["current"]["nll"],
                    "lookahead": {f"{s:g}": p["asr"] for s, p in result["lookahead"].items()},
                    "lookahead_nll": {f"{s:g}": p["nll"] for s, p in result["lookahead"].items()},
                    "edge_distance": result["edge_distance"],
                    "edge_found": result["edge_found"],
                    "visage_ft": result["visage_ft"],
                    "status": STATUS_NAMES[status],
                    "reasons": result["reasons"],
                    "probe_seconds": result["seconds"],
                }
            )
            self.last_probe = record
            self._decide(status, result, step, model, control)
        self._emit(metrics, record)

    def _decide(
        self,
        status: int,
        result: dict[str, Any],
        step: int,
        model: nn.Module,
        control: TrainerControl,
    ) -> None:
        reasons = "; ".join(result["reasons"]) or "outside the basin"
        if status == OK:
            self.last_safe_step = step
            if self.config.keep_last_safe and (
                self.tracker.kind == "lora" or self.config.keep_last_safe_full
            ):
                self._save_last_safe(model, step)
            return
        if status == WARN:
            self.warn_count += 1
            message = f"SafetyGuard step {step}: {reasons}. The finetune is heading out of the safety basin."
            logger.warning(message)
            warnings.warn(message, SafetyGuardWarning, stacklevel=2)
            return
        message = (
            f"SafetyGuard step {step}: {reasons}."
            + (" Halting training." if self.config.halt else " (halt disabled)")
            + (
                f" Last in-basin step: {self.last_safe_step}."
                if self.last_safe_step is not None
                else ""
            )
        )
        logger.warning(message)
        warnings.warn(message, SafetyGuardWarning, stacklevel=2)
        if self.config.halt:
            self.halt_step = step
            control.should_training_stop = True

    def _save_last_safe(self, model: nn.Module, step: int) -> None:
        if not self._is_main or self._dir is None:
            return
        target = self._dir / "last-safe"
        self._dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".last-safe-", dir=self._dir))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            (tmp / "safety_guard_step.json").write_text(json.dumps({"step": step}))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _emit(self, metrics: dict[str, float], record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.trainer is not None:
            self.trainer.log(metrics)
        if self._is_main and self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            with (self._dir / "trajectory.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # every rank waits here until the main process has written its files, so that no rank
        # exits (and tears down the process group) while the main process is still plotting
        try:
            if self._is_main and self._dir is not None and self.records:
                self._write_outputs(self._dir)
        finally:
            _barrier()

    def _write_outputs(self, folder: Path) -> None:
        (folder / "summary.json").write_text(json.dumps(self.summary(), indent=1))
        try:
            from ..plotting import plot_trajectory

            records = [
                {**r, "event": r.get("status") if r.get("status") in ("warn", "halt") else None}
                for r in self.records
            ]
            plot_trajectory(records, folder / "trajectory.png", landscape=self.landscape)
        except Exception as err:  # a plot must never fail a finished training run
            logger.warning("SafetyGuard: could not plot the trajectory: %s", err)

    def summary(self) -> dict[str, Any]:
        """What the guard saw and did, for reports."""
        probes = [r for r in self.records if r.get("event") == "probe"]
        return {
            "halt_step": self.halt_step,
            "last_safe_step": self.last_safe_step,
            "warn_count": self.warn_count,
            "probes": len(probes),
            "checks": len(self.check_seconds),
            "max_asr": max((r["asr"] for r in probes), default=None),
            "final": probes[-1] if probes else None,
            "mean_probe_seconds": sum(self.probe_seconds) / len(self.probe_seconds)
            if self.probe_seconds
            else None,
            "mean_check_seconds": sum(self.check_seconds) / len(self.check_seconds)
            if self.check_seconds
            else None,
            "aligned_asr": self.aligned_asr,
            "basin_radius": self.basin_radius,
        }


def _is_lora_model(model: nn.Module) -> bool:
    from .displacement import _is_lora

    return _is_lora(model)
