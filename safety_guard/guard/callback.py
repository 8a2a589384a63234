"""``SafetyGuardCallback``: halt a ``Trainer``/``SFTTrainer`` finetune before it breaks the
aligned model's safety.

Add it to an existing script, either way::

    trainer = SFTTrainer(..., callbacks=[SafetyGuardCallback(landscape="landscape.json")])
    guard = SafetyGuardCallback(landscape="landscape.json").attach(trainer)

The callback is a :class:`~safety_guard.guard.guard.Guard` (which decides: the promise, checks,
probes, halts, last safe weights, files) wired into the Trainer: the guard is built at train
begin on the trainer's model, tokenizer (``processing_class``), learning-rate scheduler and
``max_steps``; a step's ``halt`` sets ``control.should_training_stop``; its folder is
``<output_dir>/safety-guard`` unless ``GuardConfig.output_dir`` says otherwise.

``safety/*`` metrics reach your loggers (TensorBoard, W&B, ...) and ``trainer.state.log_history``
as entries of their own, at your ``logging_steps`` and at every probe, warning and halt; the
Trainer's own entries (``loss``, ``grad_norm``, ...) are exactly those it logs without the guard
(:mod:`~safety_guard.guard.reporting`).

**Resume**: the guard's state is saved in every checkpoint (``ExportableState``) and restored on
``trainer.train(resume_from_checkpoint=...)``; trajectory records past the checkpoint's step are
dropped, so a resumed run's trajectory, counters and decisions equal an uninterrupted run's.

Example:
    >>> cb = SafetyGuardCallback(landscape=None, max_asr_rise=15)
    >>> cb.config.max_asr_rise
    15
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, ExportableState

from safety_guard.guard.config import GuardConfig
from safety_guard.guard.guard import Guard, SafetyGuardWarning
from safety_guard.guard.reporting import calling_handler, deliver
from safety_guard.guard.setup import config_and_judge, open_landscape
from safety_guard.landscape import Landscape
from safety_guard.measure.judges import Judge

__all__ = ["SafetyGuardCallback", "SafetyGuardWarning"]

logger = logging.getLogger(__name__)


class SafetyGuardCallback(TrainerCallback, ExportableState):
    """Guard a finetune; stop it before its ASR rises more than ``max_asr_rise`` points.

    Args:
        landscape: a landscape file (or :class:`~safety_guard.landscape.Landscape`) of the
            model *before* finetuning, checked against the model at train begin. ``None``
            computes a small one at train begin in the guard's folder, or reuses the one a
            resumed run computed.
        config: a :class:`GuardConfig` (or its ``to_dict()``); keyword arguments override fields.
        trainer: the trainer (or call :meth:`attach`); optional: the guard finds the trainer's
            callbacks (your loggers) when training begins.
        tokenizer: the tokenizer (default: the trainer's ``processing_class``).
        judge: the judge of generated answers, or a ``GuardConfig.judge`` string (default: the
            one ``config.judge`` names, loaded here, once).
    """

    def __init__(
        self,
        landscape: str | os.PathLike[str] | Landscape | None = None,
        config: GuardConfig | dict[str, Any] | None = None,
        *,
        trainer: Any = None,
        tokenizer: Any = None,
        judge: Judge | str | None = None,
        **overrides: Any,
    ) -> None:
        self.landscape, self.landscape_path = open_landscape(landscape)  # a bad file fails now
        self.config, judge = config_and_judge(config, overrides, judge, "SafetyGuardCallback")
        self.trainer, self.tokenizer, self.judge = trainer, tokenizer, judge  # (loaded once)
        self.guard: Guard | None = None  # built at each train begin
        self._handler: CallbackHandler | None = None  # the trainer's, found at train begin
        self._pending: dict[str, float] = {}  # safety/* values for the next log entry
        self._delivering = False

    def attach(self, trainer: Any) -> SafetyGuardCallback:
        """Register with ``trainer`` (``trainer.add_callback``); the same as
        ``callbacks=[guard]``.

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

    # -- what the guard did ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What the guard saw and did (:meth:`Guard.summary`); empty before training."""
        return self.guard.summary() if self.guard else {}

    @property
    def records(self) -> list[dict[str, Any]]:
        """The trajectory as its file keeps it: a JSON record per check or probe."""
        return [r.to_json() for r in self.guard.state.records] if self.guard else []

    @property
    def halt_step(self) -> int | None:
        """The step the guard halted the run at (None: it did not)."""
        return self.guard.state.halt_step if self.guard else None

    @property
    def halt_reason(self) -> str | None:
        """Why the guard halted the run."""
        return self.guard.state.halt_reason if self.guard else None

    @property
    def last_safe_step(self) -> int | None:
        """The last step a probe found within the promise."""
        return self.guard.state.last_safe_step if self.guard else None

    @property
    def total_seconds(self) -> float:
        """All of the guard's time in this run (setup, checks, probes, files)."""
        return self.guard.state.total_seconds if self.guard else 0.0

    # -- ExportableState ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The guard's state for the checkpoint (transformers stores it in trainer_state.json)."""
        return {
            "args": {"landscape": self.landscape_path, "config": self.config.to_dict()},
            "attributes": {"restored_state": self.guard.state_dict() if self.guard else None},
        }

    # -- events -----------------------------------------------------------------------------------------
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Refuse, as the trainer is built, what would break the guard on a resume."""
        _refuse_callback_restore(args)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tokenizer = self.tokenizer or kwargs.get("processing_class") or kwargs.get("tokenizer")
        if tokenizer is None:
            raise ValueError(
                "SafetyGuardCallback needs the tokenizer: pass processing_class=tokenizer to the "
                "trainer or tokenizer=... to the callback."
            )
        _refuse_callback_restore(args)
        self._handler = calling_handler(self)  # this trainer's (a guard may serve several)
        self._pending = {}
        if self._handler is None:
            logger.info(
                "SafetyGuard: no trainer found; safety/* metrics go to the trajectory file and "
                "trainer.state.log_history only. SafetyGuardCallback(...).attach(trainer) sends "
                "them to your loggers."
            )
        else:
            _refuse_second_guard(self._handler, self)
        self.guard = Guard(
            kwargs["model"],
            tokenizer,
            self.landscape,
            self.config,
            self.config.output_dir or Path(args.output_dir) / "safety-guard",
            judge=self.judge,
            progress=not getattr(args, "disable_tqdm", False),  # (the Guard: main process only)
        )
        self.guard.landscape_path = self.landscape_path or self.guard.landscape_path
        saved = _saved_state(state) if state.global_step > 0 else None
        if saved is not None:
            self.guard.load_state_dict(saved)
        self.guard.begin(
            state.max_steps, step=state.global_step, lr_schedule=kwargs.get("lr_scheduler")
        )
        # a landscape computed at train begin serves the next train() of this callback too
        self.landscape, self.landscape_path = self.guard.landscape, self.guard.landscape_path

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._delivering or self.guard is None:  # the guard's own entry
            return
        decision = self.guard.observe(state.global_step, logs or {})
        if decision is not None and decision.halt:
            control.should_training_stop = True

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.guard is None:
            return
        decision = self.guard.step(state.global_step)
        if decision.halt:
            control.should_training_stop = True
        self._pending.update(decision.metrics)
        if decision.metrics and (decision.event or control.should_log):
            self._flush(args, state, control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.guard is None:
            return
        if self._pending:  # the last steps' values, not at a logging step
            self._flush(args, state, control)
        self.guard.end()

    def _flush(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Log the pending ``safety/*`` values as one entry (:func:`reporting.deliver`)."""
        self._delivering = True
        try:
            deliver(self._handler, args, state, control, self._pending)
        finally:
            self._delivering = False
            self._pending = {}


def _saved_state(state: TrainerState) -> dict[str, Any] | None:
    """The guard's state in the checkpoint being resumed (None if it holds none)."""
    stored = (state.stateful_callbacks or {}).get(SafetyGuardCallback.__name__)
    if isinstance(stored, list):
        stored = stored[0] if stored else None
    if not isinstance(stored, dict):
        return None
    return stored.get("attributes", {}).get("restored_state")


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
