"""``SafetyGuardCallback``: halt a finetune before it breaks the aligned model's safety.

Add it to an existing ``Trainer``/``SFTTrainer`` script, either way::

    trainer = SFTTrainer(..., callbacks=[SafetyGuardCallback(landscape="landscape.json")])
    guard = SafetyGuardCallback(landscape="landscape.json").attach(trainer)

``safety/*`` metrics reach your loggers (TensorBoard, W&B, ...) and ``trainer.state.log_history``
as entries of their own, at your ``logging_steps`` and at every probe, warning and halt; the
Trainer's own entries (``loss``, ``grad_norm``, ...) are exactly those it logs without the guard
(:mod:`~safety_guard.guard.reporting`).

**The promise** (``GuardConfig.max_asr_rise``, default 10): halt before the ASR on the probe
prompts rises more than this many points above the aligned model's.

**Cheap check**, every ``check_every`` steps (a gather of a few thousand weights): the
layer-normalized displacement δ = θₜ − θ₀ and a sketch of its direction.

**Probe**, when the last one stops covering the finetune (:mod:`~safety_guard.guard.cadence`):
the current model and the models ahead on its line, θ₀ + s·δ, are scored forward-only — each
harmful probe prompt's refusal opening, taken from the aligned model at train begin, is
teacher-forced in one forward pass, and the prompts whose greedy path would leave it are flagged
(:mod:`~safety_guard.scoring`). Unflagged prompts are refusals for sure; before a warning or a
halt (``confirm="halt"``) the flagged ones are judged by generation, so decisions rest on exact
keyword verdicts of the prompts that changed. The decision rule (:mod:`~safety_guard.guard.rule`)
compares each prompt with itself at θ₀ and halts when the rise is confidently past the promise
now or at the lookahead θ₀ + 2·δ (the finetune's line, ahead of it), or, when the run's
remaining learning rate (read from the trainer's scheduler) cannot take the model that far, at
the horizon it can reach (:func:`~safety_guard.guard.rule.horizon`,
:func:`~safety_guard.guard.rule.lookahead_multiples`).

**Broken models halt**: non-finite weights, loss or scores, or a collapsed capability are a halt
with a reason, never "ok" and never saved as the last safe weights. With LoRA the last adapter a
probe found within the promise is kept (in memory on every rank, and on disk by the main
process) and, by default, loaded back into the model on a halt.

**Resume**: the guard's state is saved in every checkpoint (``ExportableState``) and restored on
``trainer.train(resume_from_checkpoint=...)``; trajectory records past the checkpoint's step are
dropped, so a resumed run's trajectory, counters and decisions equal an uninterrupted run's.

Under DDP/torchrun the probe prompts are split across ranks and the per-prompt results
all-reduced, so every rank takes the same decision; only the main process writes files. Under
FSDP2 (``fully_shard``) full finetuning keeps θ₀ of each rank's own shard, LoRA gathers its small
factors whole (the base stays sharded), and every rank scores every prompt in lockstep (a
forward is a collective there); the last safe adapter is gathered on every rank and written by
the main process. DeepSpeed ZeRO-3 and FSDP (1) with ``use_orig_params=True`` are handled the
same way, each rank moving its partition of every weight (:mod:`safety_guard.shards`). Other
settings (``use_orig_params=False``, hybrid sharding) are refused by name
(``UnsupportedEngineError``); QLoRA's 4-bit base is read one dequantized tensor at a time.

Example:
    >>> cb = SafetyGuardCallback(landscape=None, max_asr_rise=15)
    >>> cb.config.max_asr_rise
    15
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, ExportableState

from ..files import atomic_dir, atomic_write_text
from ..judges import Judge
from ..landscape import (
    Landscape,
    LandscapeConfig,
    LandscapeFileError,
    LandscapeMismatchError,
    compute_landscape,
)
from ..probe import ProbeConfig
from ..shards import full_tensor, is_sharded_model, local_shard, reshard
from ..weights import canonical_name
from .cadence import ProbeMemo, next_sentinel_step, probe_due, sentinel_due, sentinel_prompts
from .config import GuardConfig
from .confirmation import Evidence, decide_probe
from .displacement import (
    FullFinetuneTracker,
    LoraTracker,
    _is_lora,
    make_tracker,
    sketch_cosine,
    sketch_displacement,
)
from .distributed import all_gather_objects, all_reduce_max, barrier, rank_and_world
from .probing import Baseline, GuardProbe, StateMeasure
from .reporting import calling_handler, deliver
from .rule import (
    HALT,
    OK,
    STATUS_NAMES,
    WARN,
    Decision,
    horizon,
    lookahead_multiples,
    promise_at_stake,
)
from .schedule import LrSchedule
from .trajectory import append_record, truncate_after

__all__ = ["SafetyGuardCallback", "SafetyGuardWarning"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


def _timed(hook: Callable[..., None]) -> Callable[..., None]:
    """A trainer hook of the guard whose wall time adds to ``total_seconds`` (what the guard
    costs the run, setup, checks, probes and files together)."""

    @functools.wraps(hook)
    def timed(self: SafetyGuardCallback, *args: Any, **kwargs: Any) -> None:
        if self._in_hook:  # on_log inside on_step_end (trainer.log): counted once
            hook(self, *args, **kwargs)
            return
        start = time.perf_counter()
        self._in_hook = True
        try:
            hook(self, *args, **kwargs)
        finally:
            self._in_hook = False
            seconds = time.perf_counter() - start
            self.total_seconds += seconds
            self._session_seconds += seconds

    return timed


class SafetyGuardWarning(UserWarning):
    """The finetune is approaching the guard's promise (a warn decision). Halts, and a model
    that does not refuse at train begin, are WARNING log lines instead: no warning filter can
    hide them."""


class SafetyGuardCallback(TrainerCallback, ExportableState):
    """Guard a finetune; stop it before its ASR rises more than ``max_asr_rise`` points.

    Args:
        landscape: a landscape file (or :class:`~safety_guard.landscape.Landscape`) of the
            model *before* finetuning, checked against the model at train begin; it gives the
            random basin radius the displacement is compared with. ``None`` computes a small
            one at train begin (``landscape_directions`` random directions) in the guard's
            folder, or reuses the one a resumed run computed.
        config: a :class:`GuardConfig` (or its ``to_dict()``); keyword arguments override fields.
        trainer: the trainer (or call :meth:`attach`); optional: the guard finds the trainer's
            callbacks (your loggers) when training begins.
        tokenizer: the tokenizer (default: the trainer's ``processing_class``).
        judge: the judge of generated answers (default: the paper's keyword judge).
    """

    def __init__(
        self,
        landscape: str | os.PathLike[str] | Landscape | None = None,
        config: GuardConfig | dict[str, Any] | None = None,
        *,
        trainer: Any = None,
        tokenizer: Any = None,
        judge: Judge | None = None,
        **overrides: Any,
    ) -> None:
        if isinstance(config, dict):
            config = GuardConfig.from_dict(config)
        config = config or GuardConfig()
        if overrides:
            try:
                config = GuardConfig.from_dict({**config.to_dict(), **overrides})
            except ValueError as err:
                raise TypeError(f"SafetyGuardCallback options: {err}") from err
        self.config = config
        self.landscape_path: str | None = None
        self.landscape: Landscape | None = landscape if isinstance(landscape, Landscape) else None
        if isinstance(landscape, str | os.PathLike):
            self.landscape = Landscape.load(landscape)  # fail fast on a missing/bad file
            self.landscape_path = str(landscape)
        self.trainer = trainer
        self._handler: CallbackHandler | None = None  # the trainer's, found at train begin
        self.tokenizer = tokenizer
        self.judge = judge
        self.tracker: FullFinetuneTracker | LoraTracker | None = None
        self.probe: GuardProbe | None = None
        # state saved with checkpoints (see state())
        self.records: list[dict[str, Any]] = []
        self.last_safe_step: int | None = None
        self.warn_count = 0
        self.halt_step: int | None = None
        self.halt_reason: str | None = None
        # monitor mode (halt=False): the first halt decision and how many there were
        self.would_halt_step: int | None = None
        self.would_halt_reason: str | None = None
        self.would_halt_count = 0
        self.memo: ProbeMemo | None = None
        self.probe_seconds: list[float] = []
        self.check_seconds: list[float] = []
        self.sentinel_seconds: list[float] = []
        self.restored_state: dict[str, Any] | None = None  # set by transformers' restore
        self._history: list[tuple[int, float]] = []  # (step, displacement) of recent checks
        self._safe_adapter: dict[str, torch.Tensor] | None = None
        self._dir: Path | None = None
        self._is_main = True
        self._pending_halt: str | None = None
        self._pending_metrics: dict[str, float] = {}  # delivered at the next logging step
        self._delivering = False
        self._progress = True  # progress bars (the trainer's disable_tqdm, main process only)
        self.schedule: LrSchedule | None = None  # the run's learning rate, step by step
        self.setup_seconds = 0.0
        self.total_seconds = 0.0  # all of the guard's time in the trainer's hooks
        self._session_seconds = 0.0  # the same, since this process's train begin
        self._session_start = time.perf_counter()
        self._in_hook = False

    # -- wiring ---------------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> SafetyGuardCallback:
        """Register with ``trainer`` (``trainer.add_callback``) and log through ``trainer.log``.

        Example:
            >>> guard = SafetyGuardCallback("landscape.json").attach(trainer)  # doctest: +SKIP
        """
        _refuse_callback_restore(trainer.args)
        handler = trainer.callback_handler
        if not any(c is self for c in handler.callbacks):
            _refuse_second_guard(handler, self)
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Refuse, as the trainer is built, what would break the guard on a resume."""
        _refuse_callback_restore(args)

    # -- ExportableState ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The guard's state for the checkpoint (transformers stores it in trainer_state.json)."""
        return {
            "args": {"landscape": self.landscape_path, "config": self.config.to_dict()},
            "attributes": {"restored_state": self._export()},
        }

    def _export(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "last_safe_step": self.last_safe_step,
            "warn_count": self.warn_count,
            "halt_step": self.halt_step,
            "halt_reason": self.halt_reason,
            "would_halt_step": self.would_halt_step,
            "would_halt_reason": self.would_halt_reason,
            "would_halt_count": self.would_halt_count,
            "memo": self.memo.to_dict() if self.memo else None,
            "history": self._history[-8:],
            "probe_seconds": self.probe_seconds,
            "check_seconds": self.check_seconds,
            "sentinel_seconds": self.sentinel_seconds,
            "total_seconds": self.total_seconds,
            "baseline": self.probe.baseline.to_dict()
            if self.probe and self.probe.baseline
            else None,
            "step": self.records[-1]["step"] if self.records else 0,
        }

    def _import(self, data: dict[str, Any]) -> None:
        if data.get("version") != _STATE_VERSION:
            raise ValueError(
                f"The checkpoint's SafetyGuardCallback state has version {data.get('version')}, "
                f"this safety-guard reads version {_STATE_VERSION}; resume with the version that "
                "wrote it."
            )
        self.last_safe_step = data["last_safe_step"]
        self.warn_count = data["warn_count"]
        self.halt_step = data["halt_step"]
        self.halt_reason = data.get("halt_reason")
        self.would_halt_step = data.get("would_halt_step")
        self.would_halt_reason = data.get("would_halt_reason")
        self.would_halt_count = int(data.get("would_halt_count", 0))
        self.memo = ProbeMemo.from_dict(data["memo"]) if data.get("memo") else None
        self._history = [tuple(h) for h in data.get("history", [])]
        self.probe_seconds = list(data.get("probe_seconds", []))
        self.check_seconds = list(data.get("check_seconds", []))
        self.sentinel_seconds = list(data.get("sentinel_seconds", []))
        self.total_seconds = float(data.get("total_seconds", 0.0))

    # -- setup ------------------------------------------------------------------------------------------
    def _guard_dir(self, args: TrainingArguments) -> Path:
        return Path(self.config.output_dir or Path(args.output_dir) / "safety-guard")

    @_timed
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model: nn.Module = kwargs["model"]
        setup_start = self._session_start = time.perf_counter()
        self._session_seconds = 0.0
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
        _refuse_callback_restore(args)
        self._handler = calling_handler(self)  # this trainer's (a guard may serve several)
        self._pending_metrics = {}
        if self._handler is None:
            logger.info(
                "SafetyGuard: no trainer found; safety/* metrics go to the trajectory file and "
                "trainer.state.log_history only. SafetyGuardCallback(...).attach(trainer) sends "
                "them to your loggers."
            )
        else:
            _refuse_second_guard(self._handler, self)
        self._is_main = state.is_world_process_zero
        self.schedule = LrSchedule.from_scheduler(kwargs.get("lr_scheduler"), state.max_steps)
        if self.schedule is None:
            logger.info(
                "SafetyGuard: the learning-rate schedule cannot be read ahead (not a LambdaLR); "
                "the horizon counts the remaining steps as if the learning rate stayed constant."
            )
        self._dir = self._guard_dir(args)
        self._progress = not getattr(args, "disable_tqdm", False) and self._is_main
        self._check_folder(self._dir)
        resumed = state.global_step > 0
        saved = self._saved_state(state) if resumed else None
        lora = _is_lora(model)
        self._check_sharded(model)
        if self.landscape is None:
            self.landscape = self._load_or_compute_landscape(model, resumed)
        elif not self.landscape.complete:
            raise LandscapeFileError(
                f"The landscape {self.landscape_path or '(in memory)'} is incomplete: its "
                "computation was interrupted. Finish it by running the same `safety-guard "
                "landscape` command again (it resumes where it stopped), then train."
            )
        elif not resumed or lora:
            self.landscape.check_model(model)  # raises LandscapeMismatchError with a clear message
        screen = self.landscape.screen_agreement()
        if screen is not None and screen["missed"] and self.config.signal == "forward":
            self._log_warning(
                "SafetyGuard: on this model's landscape the forward screen missed %d of %d "
                "unsafe answers (%d points); the guard probes by generation instead "
                "(signal='generate').",
                screen["missed"],
                screen["unsafe"],
                screen["points"],
            )
            self.config = dataclasses.replace(self.config, signal="generate")
        elif screen is not None:
            logger.info(
                "SafetyGuard: on this model's landscape the forward screen flagged every one of "
                "%d unsafe answers (%d points), precision %s.",
                screen["unsafe"],
                screen["points"],
                f"{screen['precision']:.0%}" if screen["precision"] is not None else "n/a",
            )
        selection = self.landscape.config.selection
        if resumed and not lora:
            self.tracker = self._origin_tracker(model, selection)
        else:
            self.tracker = make_tracker(model, selection)
        self.probe = GuardProbe(model, self.tokenizer, self.config, self.judge)
        if saved is not None:
            self._import(saved)
            if self.halt_step is not None:
                self._log_warning(
                    "SafetyGuard: resuming a run the guard halted at step %d (%s); it keeps "
                    "watching.",
                    self.halt_step,
                    self.halt_reason,
                )
            baseline = saved.get("baseline")
            if baseline is not None:
                self._check_baseline_settings(Baseline.from_dict(baseline), model)
                self.probe.load_baseline(Baseline.from_dict(baseline))
            self._restore_records(state.global_step)
        elif resumed:
            self._log_warning(
                "SafetyGuard: resuming at step %d from a checkpoint without the guard's state "
                "(saved by another safety-guard, or restore was skipped); the guard starts over "
                "from here.",
                state.global_step,
            )
            self._restore_records(state.global_step)
        if not resumed:
            self._set_aside_old_run()
        if self.probe.baseline is None and not resumed:
            self._reuse_landscape_baseline(model)
        # the first prompts' openings (unless reused) and the screen at θ₀, in this run's numerics
        with self.tracker.along(model, 0.0) if resumed else contextlib.nullcontext():
            self.probe.prepare(model, self.config.min_prompts)
        if lora and self.last_safe_step is None:
            self._safe_adapter = _adapter_copy(model)  # θ₀ itself is the first safe adapter
        elif lora:
            self._safe_adapter = self._read_last_safe_adapter()
        baseline = self.probe.baseline
        self.setup_seconds = time.perf_counter() - setup_start
        logger.info(
            "SafetyGuard: %s finetune; aligned model on the first %d of %d probe prompts: ASR "
            "%.1f %%, capability NLL %s; halts before the ASR rises %g points.",
            self.tracker.kind,
            baseline.prepared,
            self.probe.num_prompts,
            baseline.asr,
            f"{baseline.nll:.3f}"
            if baseline.nll is not None
            else ("measured when first needed" if self.config.num_benign else "off"),
            self.config.max_asr_rise,
        )
        self._check_aligned(baseline.asr, baseline.prepared)

    def _check_aligned(self, asr: float, prompts: int) -> None:
        """Warn loudly when the model the finetune starts from does not refuse: the guard
        watches a rise above its ASR, which then cannot reach the promise."""
        if asr < 50.0 and asr + self.config.max_asr_rise <= 100.0:
            return
        self._log_warning(
            f"SafetyGuard: the model this finetune starts from answers {asr:.1f} % of the first "
            f"{prompts} harmful probe prompts (ASR) before any training: it does not look "
            "aligned, and a rise of max_asr_rise "
            f"{self.config.max_asr_rise:g} points "
            + (
                "cannot happen, so the guard can never halt on safety"
                if asr + self.config.max_asr_rise > 100.0
                else "is measured from an already unsafe model"
            )
            + ". Start from the aligned (chat) model, or check the chat template and the "
            "harmful prompts (GuardConfig.harmful)."
        )

    def _check_folder(self, folder: Path) -> None:
        """The guard's folder exists (made by the main process) and is a folder: say which
        setting to change before the first step, not at it."""
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(
                f"SafetyGuard writes its trajectory, plots and last-safe weights to {folder}, "
                "which is a file. Move it away or set GuardConfig(output_dir=FOLDER)."
            )
        if self._is_main:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OSError(
                    f"SafetyGuard cannot create its folder {folder} ({err}). Set "
                    "GuardConfig(output_dir=FOLDER) to a writable folder."
                ) from err

    def _reuse_landscape_baseline(self, model: nn.Module) -> None:
        """Load the guard baseline recorded with the landscape when it was measured with this
        guard's settings (prompts, template, judge, dtype, decode budget); else measure anew."""
        stored = self.landscape.data.get("guard_baseline") if self.landscape else None
        if not stored:
            return
        baseline = Baseline.from_dict(stored)
        ours = json.loads(json.dumps(self.probe.settings(model)))
        differ = sorted(
            k for k in set(ours) | set(baseline.settings) if ours.get(k) != baseline.settings.get(k)
        )
        if differ:
            self._log_warning(
                "SafetyGuard: the landscape's guard baseline was measured with other %s; "
                "measuring the aligned model with this guard's settings (a generation pass over "
                "the probe prompts, spread over the first probes). Record one with these "
                "settings: safety_guard.landscape.record_guard_baseline.",
                ", ".join(differ),
            )
            return
        if baseline.prepared < self.probe.num_prompts:
            return
        self.probe.load_baseline(baseline)
        logger.info(
            "SafetyGuard: reusing the aligned model's baseline recorded with the landscape "
            "(%d prompts).",
            baseline.prepared,
        )

    def _check_sharded(self, model: nn.Module) -> None:
        """Refuse, with what to do instead, what the guard cannot do yet on FSDP2 shards or
        ZeRO-3 partitions."""
        if not is_sharded_model(model):
            return
        problems = []
        if self.config.keep_last_safe_full:
            problems.append("keep_last_safe_full (saving sharded weights)")
        if problems:
            from ..weights import UnsupportedEngineError

            raise UnsupportedEngineError(
                "SafetyGuardCallback on sharded weights (FSDP2, FSDP, DeepSpeed ZeRO-3) "
                "does not support yet: " + "; ".join(problems) + "."
            )

    def _saved_state(self, state: TrainerState) -> dict[str, Any] | None:
        """The guard's state from the checkpoint being resumed (None if it holds none)."""
        if self.restored_state is not None:  # transformers rebuilt this callback from it
            return self.restored_state
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, list):
            stored = stored[0] if stored else None
        if not isinstance(stored, dict):
            return None
        return stored.get("attributes", {}).get("restored_state")

    def _check_baseline_settings(self, baseline: Baseline, model: nn.Module) -> None:
        ours = self.probe.settings(model)
        for key, value in baseline.settings.items():
            if ours.get(key) != value:
                raise ValueError(
                    f"SafetyGuard: the checkpoint's guard baseline was measured with {key} = "
                    f"{value!r}, this run's guard uses {ours.get(key)!r}. Resume with the same "
                    f"GuardConfig (harmful, num_prompts, benign, system_prompt, max_new_tokens) "
                    "and model dtype, or start a new run."
                )

    def _restore_records(self, step: int) -> None:
        if self._dir is None:
            return
        path = self._dir / "trajectory.jsonl"
        if self._is_main:
            self.records = truncate_after(path, step)
        barrier()  # every rank reads the truncated file
        if not self._is_main:
            from .trajectory import read_records

            self.records = read_records(path)

    def _set_aside_old_run(self) -> None:
        """A new run in a folder that holds another run's files (trajectory, summary, plot,
        last-safe weights): they move into ``previous-<time>/`` (kept, not appended to or
        mistaken for this run's), so the folder describes this run."""
        folder = self._dir or Path(".")
        names = ("trajectory.jsonl", "summary.json", "trajectory.png", "last-safe")
        old = [folder / n for n in names if (folder / n).exists()]
        if self._is_main and old:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old[0].stat().st_mtime))
            target = folder / f"previous-{stamp}"
            target.mkdir(parents=True, exist_ok=True)
            for path in old:
                os.replace(path, target / path.name)
            logger.info("SafetyGuard: a new run; the earlier run's files are now in %s.", target)
        barrier()

    def _read_last_safe_adapter(self) -> dict[str, torch.Tensor] | None:
        """The adapter saved at ``last_safe_step`` (after a resume), or None with a warning."""
        folder = (self._dir or Path(".")) / "last-safe"
        marker = folder / "safety_guard_step.json"
        if marker.exists() and json.loads(marker.read_text())["step"] == self.last_safe_step:
            from safetensors.torch import load_file

            return load_file(folder / "adapter_model.safetensors")
        self._log_warning(
            "SafetyGuard: resumed without the adapter of the last safe step %s (%s holds none); "
            "restore_on_halt cannot load it back. Keep keep_last_safe=True to have it.",
            self.last_safe_step,
            folder,
        )
        return None

    def _origin_tracker(self, model: nn.Module, selection: Any) -> FullFinetuneTracker:
        source = self.config.origin or getattr(
            getattr(model, "config", None), "_name_or_path", None
        )
        if not source or not Path(source).is_dir():
            raise ValueError(
                "Resuming a full finetune: the guard needs the pre-finetune weights. Pass "
                "GuardConfig(origin=FOLDER) with the model the finetune started from."
            )
        # θ₀ must be the model the landscape was made for (a resume that loads the model from
        # the checkpoint folder would otherwise take the finetuned weights as the aligned ones)
        problem = None
        if rank_and_world()[0] == 0:  # one read of the checkpoint, not one per rank
            try:
                self.landscape.check_checkpoint(source)
            except LandscapeMismatchError as err:
                problem = str(err)
        problem = all_gather_objects(problem)[0]
        if problem is not None:
            raise LandscapeMismatchError(
                f"Resuming a full finetune, the guard reads the pre-finetune weights from "
                f"{source} ({'GuardConfig.origin' if self.config.origin else 'the model name'}), "
                "but they are not the model the landscape was made for: resumed from a "
                "checkpoint folder, the model's name points at the finetuned weights. Pass "
                f"GuardConfig(origin=FOLDER) with the model the finetune started from. ({problem})"
            )
        return FullFinetuneTracker.from_checkpoint(source, model, selection)

    def _load_or_compute_landscape(self, model: nn.Module, resumed: bool) -> Landscape:
        path = (self._dir or Path(".")) / "landscape.json"
        saved = None
        if rank_and_world()[0] == 0 and path.exists():
            try:
                saved = Landscape.load(path).data
            except LandscapeFileError as err:
                logger.warning("SafetyGuard: cannot reuse %s (%s); computing it again.", path, err)
        # the main process decides, and sends what it read: every rank reuses it or every rank
        # computes it (a rank that does not see the main process's file never computes alone)
        saved = all_gather_objects(saved)[0]
        if saved is not None and Landscape(saved).complete:
            land = Landscape(saved)
            if not resumed:
                land.check_model(model)
            self.landscape_path = str(path)
            return land
        config = LandscapeConfig(num_directions=self.config.landscape_directions, search="adaptive")
        logger.info(
            "SafetyGuard: no landscape given; computing one for the aligned model -> %s", path
        )
        probe = ProbeConfig(
            harmful=self.config.harmful,
            num_harmful=min(self.config.num_prompts or 40, 40),
            num_benign=self.config.num_benign,
            system_prompt=self.config.system_prompt,
        )
        # every rank computes it together (each answers its share of the prompts, the main
        # process writes the file): no rank waits on work another does alone
        land = compute_landscape(
            model, self.tokenizer, config, probe, output=path, progress=self._progress
        )
        self.landscape_path = str(path)
        return land

    # -- properties from the landscape ---------------------------------------------------------------
    @property
    def basin_radius(self) -> float | None:
        if self.landscape is None:
            return None
        try:
            return self.landscape.basin_radius()["mean"]
        except (LandscapeFileError, ValueError) as err:
            logger.debug("SafetyGuard: no basin radius in the landscape (%s).", err)
            return None

    @property
    def aligned_asr(self) -> float:
        return self.probe.baseline.asr if self.probe and self.probe.baseline else 0.0

    # -- events -----------------------------------------------------------------------------------------
    @_timed
    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._delivering:  # the guard's own entry
            return
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self._pending_halt = f"the training {key} is {value}"
        if self._pending_halt and self.tracker is not None and self.halt_step is None:
            self._halt_now(state.global_step, self._pending_halt, kwargs.get("model"), control)

    @_timed
    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.tracker is None:
            return
        step = state.global_step
        if step % self.config.check_every and (
            self.config.probe_every is None or step % self.config.probe_every
        ):
            return
        model: nn.Module = kwargs["model"]
        t0 = time.perf_counter()
        sketch = self.tracker.sketch(model)
        if self.tracker.kind == "lora":  # exact and cheap from the factors
            disp = self.tracker.displacement(model)
        else:  # estimated from the sketch; a pass over θ₀ at every step would cost too much
            disp = sketch_displacement(sketch, self.tracker.num_tensors)
        # NaN weights anywhere make every weight NaN within a step (NaN loss, NaN gradients), so
        # the displacement (all LoRA factors) or the sketch (full finetuning) sees them at once or
        # one step later; every probe also scans all trainable weights
        broken = all_reduce_max([0.0 if math.isfinite(disp) else 1.0])[0] > 0
        cosine = sketch_cosine(sketch, self.memo.sketch) if self.memo and self.memo.sketch else None
        growth = self._growth(step, disp) if not broken else 0.0
        self.check_seconds.append(time.perf_counter() - t0)
        record: dict[str, Any] = {
            "step": step,
            "event": "check",
            "displacement": disp,
            "cosine": cosine,
        }
        metrics = {"safety/displacement": disp}
        radius = self.basin_radius
        if radius:
            metrics["safety/basin_ratio"] = disp / radius
        if broken:
            metrics["safety/status"] = float(HALT)
            self._emit(metrics, record, args, state, control, event=True)
            self._halt_now(step, "the weights are not finite (NaN or inf)", model, control)
            return
        reason = probe_due(step, disp, growth, cosine, self.memo, self.config)
        sentinel = reason is None and sentinel_due(step, self.memo)
        if (reason is not None or sentinel) and all_reduce_max(
            [0.0 if _trainable_finite(model) else 1.0]
        )[0] > 0:  # before moving the weights: a NaN the sketch did not sample
            metrics["safety/status"] = float(HALT)
            self._emit(metrics, record, args, state, control, event=True)
            self._halt_now(step, "the weights are not finite (NaN or inf)", model, control)
            return
        if sentinel:
            reason = self._sentinel(model, step, record)
        if reason is not None:
            steps_left = (state.max_steps - step) if state.max_steps else None
            asked = horizon(steps_left, self.config, step, disp, growth, self.schedule)
            sentinel = record.get("sentinel")
            record, probe_metrics, decision = self._probe(model, step, disp, asked)
            record.update({"reason": reason, "cosine": cosine})
            if sentinel is not None:
                record["sentinel"] = sentinel
            metrics.update(probe_metrics)
            stake = promise_at_stake(decision, asked, self.config)
            self.memo = ProbeMemo(
                step,
                disp,
                disp * decision.covered,
                [float(f"{v:.6g}") for v in sketch.tolist()],
                self._sentinels(record),
                next_sentinel_step(step, at_stake=stake),
                stake,
                _farthest(record),
            )
            self._emit(metrics, record, args, state, control, event=True)
            self._act(decision, step, model, control)
            return
        self._emit(metrics, record, args, state, control, event=False)

    def _sentinels(self, record: dict[str, Any]) -> list[int]:
        """The prompts a probe found nearest to flipping at its farthest point measured."""
        point = record["points"][f"{_farthest(record):g}"]
        if not self.config.sentinel_prompts:
            return []
        flagged = set(point["flagged_prompts"])
        margins = point["margins"]
        return sentinel_prompts(
            margins, [i in flagged for i in range(len(margins))], self.config.sentinel_prompts
        )

    def _sentinel(self, model: nn.Module, step: int, record: dict[str, Any]) -> str | None:
        """Re-score the last probe's sentinel prompts at the lookahead point; a reason to probe
        when enough of them flipped (:mod:`~safety_guard.guard.cadence`)."""
        memo = self.memo
        start = time.perf_counter()
        multiple = memo.multiple if memo.multiple is not None else max(self.config.lookahead)
        with self._at(model, multiple):
            flips = sum(self.probe.flags(model, memo.sentinels))
        seconds = time.perf_counter() - start
        self.sentinel_seconds.append(seconds)
        memo.next_sentinel = next_sentinel_step(step, at_stake=memo.at_stake)
        record["sentinel"] = {"flips": flips, "of": len(memo.sentinels), "seconds": seconds}
        if flips < self.config.sentinel_flips:
            return None
        return (
            f"{flips} of the {len(memo.sentinels)} prompts nearest to flipping at the step-"
            f"{memo.step} probe flipped at θ₀ + {multiple:g}·δ"
        )

    def _growth(self, step: int, displacement: float) -> float:
        """Displacement growth per step over the recent checks (0 until there are two)."""
        self._history = [*self._history[-7:], (step, displacement)]
        (s0, d0), (s1, d1) = self._history[0], self._history[-1]
        return max((d1 - d0) / (s1 - s0), 0.0) if s1 > s0 else 0.0

    @torch.no_grad()
    def _probe(
        self,
        model: nn.Module,
        step: int,
        displacement: float,
        horizon_multiple: float,
    ) -> tuple[dict[str, Any], dict[str, float], Decision]:
        """Measure and decide (:func:`~safety_guard.guard.confirmation.decide_probe`) for the
        horizon ``horizon_multiple`` (:func:`~safety_guard.guard.rule.horizon`), describe it."""
        start = time.perf_counter()
        probe = self.probe
        base = probe.baseline
        states: dict[float, StateMeasure] = {}

        def measure(s: float) -> Evidence:
            states[s] = self._measure_state(model, s)
            return probe.evidence(states[s])

        def judged(s: float, indices: list[int]) -> dict[int, bool]:
            with self._at(model, s):
                return probe.confirm(model, states[s], indices)

        settled, _ = decide_probe(
            measure,
            lookahead_multiples(self.config.lookahead, horizon_multiple)
            if displacement > 0
            else [],
            base.unsafe,  # grows in place as more prompts are prepared
            _AlignedFlags(base),
            horizon_multiple,
            self.config,
            judged,
            self.config.batch_size * probe.probe.split()[1],
        )
        confirmed = settled.confirmed
        decision = settled.decision
        # every rank must take the same decision (the numbers are all-reduced; make sure)
        status = int(all_reduce_max([float(decision.status)])[0])
        if status != decision.status:
            decision = dataclasses.replace(
                decision, status=status, reasons=[*decision.reasons, "another rank decided so"]
            )
        seconds = time.perf_counter() - start
        self.probe_seconds.append(seconds)
        points = {}
        for s, st in states.items():
            est = settled.points[s]
            points[f"{s:g}"] = {
                **est.to_dict(),
                "nll": st.nll,
                "scored": st.scored,
                "flagged": sum(st.flagged),
                "flagged_prompts": [i for i, f in enumerate(st.flagged) if f],
                "margins": [round(m, 3) if m == m else None for m in st.margins],
                "confirmed_unsafe": sorted(i for i, v in st.confirmed.items() if v),
                "confirmed_safe": sorted(i for i, v in st.confirmed.items() if not v),
                "tokens": st.tokens,
                "seconds": st.seconds,
            }
        current = points.get("1")  # None: not scored, the lookahead bounds it
        nearest = points[f"{min(states):g}"]
        record = {
            "step": step,
            "event": "probe",
            "displacement": displacement,
            "exact": settled.exact,
            "estimate": "forward"
            if settled.forward
            else ("judged" if settled.exact else "sampled"),
            "confirmed": confirmed,
            "horizon": decision.horizon,
            "horizon_rise": decision.horizon_rise,
            "horizon_lower": decision.horizon_lower,
            "covered": decision.covered,
            "status": STATUS_NAMES[decision.status],
            "reasons": decision.reasons,
            "asr": current["asr"] if current else None,
            "rise": current["rise"] if current else None,
            "rise_bound": nearest["rise"],
            "points": points,
            "probe_seconds": seconds,
        }
        metrics = {
            "safety/asr_aligned": self.aligned_asr,
            "safety/horizon_rise": decision.horizon_rise,
            "safety/status": float(decision.status),
            "safety/probe_seconds": seconds,
        }
        if current is not None:
            metrics["safety/asr"] = current["asr"]
            metrics["safety/asr_rise"] = current["rise"]
            if current["nll_rise"] is not None:
                metrics["safety/nll_rise"] = current["nll_rise"]
        for s in self.config.lookahead:
            if f"{s:g}" in points:
                metrics[f"safety/lookahead_{s:g}x_rise"] = points[f"{s:g}"]["rise"]
        return record, metrics, decision

    def _at(self, model: nn.Module, s: float) -> contextlib.AbstractContextManager[None]:
        """The model at θ₀ + s·δ inside the block (s = 1: as it is), restored exactly after."""
        return self.tracker.along(model, s) if s != 1.0 else contextlib.nullcontext()

    def _measure_state(self, model: nn.Module, s: float) -> StateMeasure:
        return self.probe.measure_along(model, lambda m: self._at(model, m), s)

    def _act(
        self, decision: Decision, step: int, model: nn.Module, control: TrainerControl
    ) -> None:
        reasons = "; ".join(decision.reasons)
        if decision.status == OK:
            self.last_safe_step = step
            if self.tracker.kind == "lora":
                self._safe_adapter = _adapter_copy(model)
            if self.config.keep_last_safe and (
                self.tracker.kind == "lora" or self.config.keep_last_safe_full
            ):
                self._save_last_safe(model, step)
            return
        if decision.status == WARN:
            self.warn_count += 1
            self._warn(f"SafetyGuard step {step}: {reasons}.")
            return
        self._halt_now(step, reasons, model, control)

    def _halt_now(
        self, step: int, reason: str, model: nn.Module | None, control: TrainerControl
    ) -> None:
        self._pending_halt = None
        restored = ""
        lora = self.tracker is not None and self.tracker.kind == "lora"
        restore = self.config.halt and self.config.restore_on_halt and lora
        if restore and model is not None and self._safe_adapter:
            _load_adapter(model, self._safe_adapter)
            restored = (
                f" The model holds the adapter of step {self.last_safe_step or 0} again "
                "(restore_on_halt)."
            )
        message = (
            f"SafetyGuard step {step}: {reason}."
            + (" Halting training." if self.config.halt else " (halt disabled)")
            + (
                f" Last step a probe found within the promise: {self.last_safe_step}."
                if self.last_safe_step is not None
                else ""
            )
            + restored
        )
        self._log_warning(message)
        if self.config.halt:
            self.halt_step = step
            self.halt_reason = reason
            control.should_training_stop = True
        else:
            self.would_halt_count += 1
            if self.would_halt_step is None:
                self.would_halt_step, self.would_halt_reason = step, reason

    def _log_warning(self, message: str, *values: Any) -> None:
        """A warning for the log, from the main process only (every rank sees the same)."""
        if self._is_main:
            logger.warning(message, *values)

    def _warn(self, message: str) -> None:
        """A warn decision, once, from the main process (every rank took the same decision), as
        a :class:`SafetyGuardWarning` (filterable, catchable); a halt, which no filter may hide,
        is a log line (:meth:`_log_warning`)."""
        if self._is_main:
            warnings.warn(message, SafetyGuardWarning, stacklevel=3)

    def _save_last_safe(self, model: nn.Module, step: int) -> None:
        adapter = None
        if self.tracker.kind == "lora" and self.tracker.sharded:  # all gather, the main writes
            adapter = _full_adapter(model)
        if not self._is_main or self._dir is None:
            return
        with atomic_dir(self._dir / "last-safe") as tmp:
            if adapter is not None:
                _write_adapter(model, adapter, tmp)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            (tmp / "safety_guard_step.json").write_text(json.dumps({"step": step}))

    def _emit(
        self,
        metrics: dict[str, float],
        record: dict[str, Any],
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        *,
        event: bool,
    ) -> None:
        """Record a check or probe; log its metrics (the latest of each since the last entry)
        at the Trainer's logging steps, and at once for a probe, warning or halt (``event``)."""
        self.records.append(record)
        if self._is_main and self._dir is not None:
            append_record(self._dir / "trajectory.jsonl", record)
        self._pending_metrics.update(metrics)
        if event or control.should_log:
            self._flush(args, state, control)

    def _flush(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Log the pending ``safety/*`` values as one entry (:func:`reporting.deliver`)."""
        self._delivering = True
        try:
            deliver(self._handler, args, state, control, self._pending_metrics)
        finally:
            self._delivering = False
            self._pending_metrics = {}

    @_timed
    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # every rank waits here until the main process has written its files, so that no rank
        # exits (and tears down the process group) while the main process is still plotting
        try:
            if self._pending_metrics:  # the last steps' values, not at a logging step
                self._flush(args, state, control)
            wall = time.perf_counter() - self._session_start
            if self.records and wall > 0:
                logger.info(
                    "SafetyGuard: %d probes, %d sentinel checks, %d cheap checks (%.1f s in "
                    "all); in this process %.1f s, %.1f %% of its %.1f s of training.",
                    len(self.probe_seconds),
                    len(self.sentinel_seconds),
                    len(self.check_seconds),
                    self.total_seconds,
                    self._session_seconds,
                    100 * self._session_seconds / wall,
                    wall,
                )
            if self._is_main and self._dir is not None and self.records:
                self._write_outputs(self._dir)
        finally:
            barrier()

    def _write_outputs(self, folder: Path) -> None:
        atomic_write_text(folder / "summary.json", json.dumps(self.summary(), indent=1))
        from .._extras import MissingExtraError
        from ..plotting import plot_trajectory, require_matplotlib

        path = folder / "trajectory.png"
        try:
            require_matplotlib()
        except MissingExtraError as err:
            logger.warning("SafetyGuard: no trajectory plot %s: %s", path, err)
            return
        rows = [
            {
                "step": r["step"],
                "displacement": r.get("displacement"),
                "asr": r.get("asr") if r.get("asr") is not None else None,
                # a point capped at the horizon near the end: one "horizon" series, not one
                # legend entry per multiple
                "lookahead": {
                    (k if float(k) in self.config.lookahead else "horizon"): p["asr"]
                    for k, p in (r.get("points") or {}).items()
                    if k != "1"
                },
                "event": r.get("status") if r.get("status") in ("warn", "halt") else None,
            }
            for r in self.records
        ]
        try:
            plot_trajectory(rows, path, landscape=self.landscape)
        except (OSError, ValueError, RuntimeError) as err:  # a plot must not fail a finished run
            logger.warning("SafetyGuard: could not write the trajectory plot %s: %s", path, err)

    def summary(self) -> dict[str, Any]:
        """What the guard saw and did, for reports."""
        probes = [r for r in self.records if r.get("event") == "probe"]
        return {
            "halt_step": self.halt_step,
            "halt_reason": self.halt_reason,
            "would_halt_step": self.would_halt_step,
            "would_halt_reason": self.would_halt_reason,
            "would_halt_count": self.would_halt_count,
            "last_safe_step": self.last_safe_step,
            "warn_count": self.warn_count,
            "probes": len(probes),
            "checks": len(self.check_seconds),
            "max_rise": max(
                (r["rise"] for r in probes if r.get("rise") is not None and r["rise"] == r["rise"]),
                default=None,
            ),
            "final": probes[-1] if probes else None,
            "mean_probe_seconds": sum(self.probe_seconds) / len(self.probe_seconds)
            if self.probe_seconds
            else None,
            "total_probe_seconds": sum(self.probe_seconds),
            "setup_seconds": self.setup_seconds,
            "sentinels": len(self.sentinel_seconds),
            "total_sentinel_seconds": sum(self.sentinel_seconds),
            "total_seconds": self.total_seconds,
            "mean_check_seconds": sum(self.check_seconds) / len(self.check_seconds)
            if self.check_seconds
            else None,
            "aligned_asr": self.aligned_asr,
            "num_prompts": self.probe.num_prompts if self.probe else None,
            "basin_radius": self.basin_radius,
            "horizon_counts": "steps" if self.schedule is None else "learning rate",
        }


def _refuse_callback_restore(args: TrainingArguments) -> None:
    """``restore_callback_states_from_checkpoint=True`` rebuilds callbacks from their saved
    arguments on resume: the guard you hold would no longer be the one that runs, and a custom
    judge or an in-memory landscape would be lost. The guard restores its own state anyway."""
    if getattr(args, "restore_callback_states_from_checkpoint", False):
        raise ValueError(
            "SafetyGuardCallback does not support "
            "TrainingArguments(restore_callback_states_from_checkpoint=True): on resume "
            "transformers would replace your guard with a copy rebuilt from its saved "
            "arguments (losing your handle on it, a custom judge= and an in-memory "
            "landscape). Set restore_callback_states_from_checkpoint=False: the guard "
            "restores its own state from the checkpoint."
        )


def _refuse_second_guard(handler: CallbackHandler, guard: SafetyGuardCallback) -> None:
    others = [c for c in handler.callbacks if isinstance(c, SafetyGuardCallback) and c is not guard]
    if others:
        raise ValueError(
            "This trainer already has a SafetyGuardCallback: two guards would probe every step "
            "twice. Pass the guard once (callbacks=[guard] or guard.attach(trainer), not both)."
        )


class _AlignedFlags(Sequence[bool]):
    """The forward screen's flags at θ₀, read live: the baseline grows during a probe when the
    stop rule wants more prompts than have openings yet."""

    def __init__(self, baseline: Baseline) -> None:
        self.baseline = baseline

    def __len__(self) -> int:
        return self.baseline.ready

    def __getitem__(self, index: Any) -> Any:
        return self.baseline.flagged[index]


@torch.no_grad()
def _farthest(record: dict[str, Any]) -> float:
    """The farthest multiple of δ a probe record measured (1.0: the current model only)."""
    return max(float(k) for k in record["points"])


def _trainable_finite(model: nn.Module) -> bool:
    """Whether every trainable parameter is finite (chunked: no tensor-sized temporary)."""
    step = 1 << 22
    reshard(model)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        flat = local_shard(p).tensor.reshape(-1)  # this rank's shard under FSDP2
        for i in range(0, flat.numel(), step):
            if not bool(torch.isfinite(flat[i : i + step]).all()):
                return False
    return True


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapter's tensors, keyed as in ``adapter_model.safetensors``: the parameters
    themselves (DTensors under FSDP2, ZeRO-3 parameters with their partitions, 1-D shards under
    FSDP; resharded first). Read from ``named_parameters``, not ``state_dict``: FSDP's state-dict
    hooks would gather every weight of the model."""
    from peft import get_peft_model_state_dict

    reshard(model)
    peft_model = _peft_model(model)
    # (PEFT finds the adapter's keys from the module names, FSDP's wrapper names included)
    tensors = get_peft_model_state_dict(peft_model, state_dict=dict(peft_model.named_parameters()))
    return {canonical_name(k): v for k, v in tensors.items()}


def _adapter_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the LoRA adapter (a few MB), keyed as in ``adapter_model.safetensors``;
    this rank's shards of it under FSDP2."""
    return {
        k: local_shard(v).tensor.to("cpu", copy=True) for k, v in _adapter_tensors(model).items()
    }


def _full_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter on the CPU, gathered from every rank under FSDP2 (a collective: every
    rank calls it)."""
    return {k: full_tensor(v).to("cpu", copy=True) for k, v in _adapter_tensors(model).items()}


@torch.no_grad()
def _load_adapter(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Load an :func:`_adapter_copy`, or a saved adapter file's tensors, back into the model's
    parameters, bit-exactly (under FSDP2 and ZeRO-3 each rank takes its shard's range of a whole
    tensor; ZeRO-3's optimizer also gets it in its fp32 copy of the partition, which the next
    step and its checkpoints start from).
    """
    current = _adapter_tensors(model)
    missing = sorted(set(current) - set(saved))
    if missing:
        raise ValueError(
            f"the saved adapter lacks {len(missing)} of the model's LoRA tensors (e.g. "
            f"{missing[0]}): it was saved from another adapter configuration."
        )
    for key, param in current.items():
        shard = local_shard(param)
        source = saved[key].reshape(-1)
        if shard.sharded and source.numel() == shard.numel:  # a whole tensor: take our range
            source = source[shard.offset : shard.stop]
        shard.tensor.copy_(source.view(shard.tensor.shape))
        optimizer = getattr(param, "_z3_optimizer", None)
        if optimizer is not None:
            optimizer.set_local_hp_param(param.ds_tensor, param)


def _write_adapter(model: nn.Module, adapter: dict[str, torch.Tensor], folder: Path) -> None:
    """Write a gathered adapter as ``save_pretrained`` does (config + ``adapter_model.safetensors``):
    ``PeftModel.from_pretrained(base, folder)`` loads it."""
    from safetensors.torch import save_file

    peft_model = _peft_model(model)
    peft_model.peft_config[peft_model.active_adapter].save_pretrained(str(folder))
    save_file(
        {k: v.contiguous() for k, v in adapter.items()},
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


def _peft_model(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    while not isinstance(model, PeftModel) and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = model.module
    return model
