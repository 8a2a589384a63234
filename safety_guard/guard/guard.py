"""``Guard``: watch a finetune and say when to stop it, in any training loop.

Give it the model being finetuned and its tokenizer, call :meth:`Guard.begin` before the first
step, :meth:`Guard.step` after every optimizer step and :meth:`Guard.end` at the end; stop
training when a step's decision says ``halt``. ``SafetyGuardCallback`` is it in a ``Trainer``.

The promise (``GuardConfig.max_asr_rise``): halt before the ASR on the probe prompts rises more
than this many points above the aligned model's. Every ``check_every`` steps a cheap check
measures the displacement δ = θₜ − θ₀ (:mod:`~safety_guard.guard.displacement`); when the last
probe stops covering the finetune (:mod:`~safety_guard.guard.cadence`) a probe scores the
current model and the models ahead on its line, θ₀ + s·δ, forward-only, judges flagged prompts
before a warning or a halt (:mod:`~safety_guard.guard.confirmation`), and the rule decides at the
horizon the run's remaining learning rate can reach. Non-finite weights, loss or scores halt.
With LoRA the last adapter within the promise is kept and, by default, loaded back on a halt.

Distributed: every rank takes the same decision; only the main process writes files; sharded
models are read shard by shard (:mod:`safety_guard.engines.shards`).

Example:
    >>> guard = Guard(model, tokenizer, "landscape.json", output_dir="out/safety-guard")  # doctest: +SKIP
    >>> guard.begin(max_steps=len(loader))  # doctest: +SKIP
    >>> for step, batch in enumerate(loader, start=1):  # doctest: +SKIP
    ...     loss = model(**batch).loss
    ...     loss.backward(); optimizer.step(); optimizer.zero_grad()
    ...     if guard.step(step, loss=loss.item()).halt:
    ...         break
    >>> summary = guard.end()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safety_guard.engines.collectives import all_reduce_max, barrier, rank_and_world
from safety_guard.guard.cadence import (
    ProbeMemo,
    next_sentinel_step,
    probe_due,
    recent_growth,
    sentinel_due,
)
from safety_guard.guard.config import GuardConfig
from safety_guard.guard.confirmation import Evidence, decide_probe
from safety_guard.guard.decision import GuardDecision, SafetyGuardWarning
from safety_guard.guard.displacement import (
    FullFinetuneTracker,
    LoraTracker,
    encode_sketch,
    make_tracker,
    sketch_cosine,
    sketch_displacement,
)
from safety_guard.guard.forecast import agree, forecast, forecast_decision
from safety_guard.guard.outputs import log_costs, write_run_files
from safety_guard.guard.probing import Baseline, GuardProbe, StateMeasure
from safety_guard.guard.records import (
    CheckRecord,
    ProbeRecord,
    probe_metrics,
    probe_record,
    record_from_json,
    sentinels_of,
)
from safety_guard.guard.rule import (
    HALT,
    OK,
    WARN,
    Decision,
    horizon,
    lookahead_multiples,
    promise_at_stake,
)
from safety_guard.guard.schedule import LrSchedule
from safety_guard.guard.setup import (
    check_folder,
    check_landscape,
    check_resumed_baseline,
    check_sharded,
    config_and_judge,
    effective_settings,
    landscape_baseline,
    landscape_for,
    open_landscape,
    origin_tracker,
    read_last_safe_adapter,
    restore_records,
    save_last_safe,
    set_aside_old_run,
    unaligned_message,
)
from safety_guard.guard.state import GuardState
from safety_guard.guard.trajectory import append_record
from safety_guard.landscape import Landscape, LandscapeFileError
from safety_guard.measure.judges import Judge
from safety_guard.models.adapters import adapter_copy, is_lora, load_adapter, trainable_finite

__all__ = ["Guard", "GuardDecision", "SafetyGuardWarning"]

logger = logging.getLogger(__name__)


def _timed(method: Callable[..., Any]) -> Callable[..., Any]:
    """A guard method whose wall time adds to ``total_seconds`` (counted once when nested)."""

    @functools.wraps(method)
    def timed(self: Guard, *args: Any, **kwargs: Any) -> Any:
        if self._in_call:
            return method(self, *args, **kwargs)
        start = time.perf_counter()
        self._in_call = True
        try:
            return method(self, *args, **kwargs)
        finally:
            self._in_call = False
            seconds = time.perf_counter() - start
            self.state.total_seconds += seconds
            self._session_seconds += seconds

    return timed


class Guard:
    """Guard a finetune of ``model``; decide at each step whether to go on.

    Args:
        model: the model being finetuned (PEFT LoRA or full; DDP, FSDP and ZeRO-3 wrapped too).
        tokenizer: its tokenizer, with a chat template.
        landscape: a landscape file (or :class:`~safety_guard.landscape.Landscape`) of the model
            *before* finetuning, checked against the model at :meth:`begin`. ``None`` computes
            a small one at :meth:`begin` (in ``output_dir`` when given).
        config: a :class:`GuardConfig` (or its ``to_dict()``); keyword arguments override fields.
        output_dir: the folder of the run's trajectory, summary, plot and last safe weights
            (default: ``config.output_dir``; None writes no files).
        judge: the judge of answers, or a ``GuardConfig.judge`` string (default: ``config.judge``).
        progress: progress bars on long work (the main process only).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        landscape: str | os.PathLike[str] | Landscape | None = None,
        config: GuardConfig | dict[str, Any] | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        *,
        judge: Judge | str | None = None,
        progress: bool = True,
        **overrides: Any,
    ) -> None:
        if tokenizer is None:
            raise ValueError("Guard needs the model's tokenizer (tokenizer=...).")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The tokenizer has no chat template; the guard probes the model as a chat model. "
                "Set tokenizer.chat_template before training."
            )
        self.config, judge = config_and_judge(config, overrides, judge, "Guard")  # (loads it)
        self.model, self.tokenizer, self.judge = model, tokenizer, judge
        self.landscape, self.landscape_path = open_landscape(landscape)
        folder = output_dir if output_dir is not None else self.config.output_dir
        self.output_dir = Path(folder) if folder is not None else None
        self.is_main = rank_and_world()[0] == 0
        self.progress = progress and self.is_main
        #: the settings in effect: ``config``, or with ``signal="generate"`` when the landscape
        #: shows the forward screen missing unsafe answers on this model
        self.settings = self.config
        self.tracker: FullFinetuneTracker | LoraTracker | None = None
        self.probe: GuardProbe | None = None
        self.schedule: LrSchedule | None = None
        self.max_steps: int | None = None
        self.state = GuardState()  # saved with checkpoints (state_dict)
        self._safe_adapter: dict[str, torch.Tensor] | None = None
        self._saved: dict[str, Any] | None = None
        self._session_seconds = 0.0  # the guard's time since this process's begin
        self._session_start = time.perf_counter()
        self._in_call = False

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The guard's state for a checkpoint (JSON-ready; :class:`GuardState`).

        Example:
            >>> torch.save(guard.state_dict(), "guard.pt")  # doctest: +SKIP
        """
        baseline = self.probe.baseline if self.probe else None
        return self.state.to_dict(baseline.to_dict() if baseline else None)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from a checkpoint's :meth:`state_dict`; call it before :meth:`begin` (with the
        checkpoint's step)."""
        if self.tracker is not None:
            raise RuntimeError("Guard.load_state_dict() must come before Guard.begin().")
        GuardState.check_version(state)
        self._saved = dict(state)

    # -- begin ------------------------------------------------------------------------------------------
    @_timed
    def begin(
        self, max_steps: int | None = None, *, step: int = 0, lr_schedule: Any = None
    ) -> None:
        """Set up before the first step (``step`` > 0: resuming there): check the landscape
        against the model, measure the aligned model's baseline, keep θ₀ (or the first adapter).

        Args:
            max_steps: the run's last step (the horizon counts what is left of it).
            step: the step training starts from (a resumed run's checkpoint step).
            lr_schedule: the run's learning-rate scheduler (a ``LambdaLR``, as
                ``transformers.get_scheduler`` builds) or an :class:`LrSchedule`; None counts
                the remaining steps as if the learning rate stayed constant.
        """
        model = self.model
        setup_start = self._session_start = time.perf_counter()
        self._session_seconds = 0.0
        self.max_steps = max_steps
        self.schedule = LrSchedule.of(lr_schedule, max_steps)
        if self.output_dir is not None:
            check_folder(self.output_dir, self.is_main)
        resumed = step > 0
        lora = is_lora(model)
        check_sharded(model, self.config)
        if self.landscape is None:
            self.landscape, self.landscape_path = landscape_for(
                model,
                self.tokenizer,
                self.config,
                self.output_dir,
                resumed=resumed,
                progress=self.progress,
            )
        else:
            check_landscape(
                self.landscape, self.landscape_path, model, check_weights=not resumed or lora
            )
        self.settings = effective_settings(self.config, self.landscape, self._log_warning)
        selection = self.landscape.config.selection
        if resumed and not lora:
            self.tracker = origin_tracker(model, self.landscape, self.config, selection)
        else:
            self.tracker = make_tracker(model, selection)
        self.probe = GuardProbe(model, self.tokenizer, self.settings, self.judge)
        self._resume(model, step)
        if not resumed and self.output_dir is not None:
            set_aside_old_run(self.output_dir, self.is_main)
        if self.probe.baseline is None and not resumed:
            recorded = landscape_baseline(
                self.landscape,
                self.probe.settings(model),
                self.probe.num_prompts,
                self._log_warning,
            )
            if recorded is not None:
                self.probe.load_baseline(recorded)
        # the first prompts' openings (unless reused) and the screen at θ₀, in this run's numerics
        with self.tracker.along(model, 0.0) if resumed else contextlib.nullcontext():
            self.probe.prepare(model, self.config.min_prompts)
        if lora:
            self._safe_adapter = (
                adapter_copy(model)  # θ₀ itself is the first safe adapter
                if self.state.last_safe_step is None
                else read_last_safe_adapter(
                    self.output_dir, self.state.last_safe_step, self._log_warning
                )
            )
        baseline = self.probe.baseline
        self.state.setup_seconds = time.perf_counter() - setup_start
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
        message = unaligned_message(baseline.asr, baseline.prepared, self.config.max_asr_rise)
        if message is not None:
            self._log_warning(message)

    def _resume(self, model: nn.Module, step: int) -> None:
        """Take the saved state (:meth:`load_state_dict`) and the trajectory up to ``step``."""
        if self._saved is not None:
            self.state = GuardState.from_dict(self._saved)
            if self.state.halt_step is not None:
                self._log_warning(
                    "SafetyGuard: resuming a run the guard halted at step %d (%s); it keeps "
                    "watching.",
                    self.state.halt_step,
                    self.state.halt_reason,
                )
            if self._saved.get("baseline") is not None:
                baseline = Baseline.from_dict(self._saved["baseline"])
                check_resumed_baseline(baseline, self.probe.settings(model))
                self.probe.load_baseline(baseline)
        elif step > 0:
            self._log_warning(
                "SafetyGuard: resuming at step %d from a checkpoint without the guard's state "
                "(saved by another safety-guard, or restore was skipped); the guard starts over "
                "from here.",
                step,
            )
        if step > 0 and self.output_dir is not None:
            restored = restore_records(self.output_dir, step, self.is_main)
            self.state.records = [record_from_json(r) for r in restored]

    # -- properties -------------------------------------------------------------------------------------
    @property
    def basin_radius(self) -> float | None:
        """The landscape's mean basin radius (None without one)."""
        if self.landscape is None:
            return None
        try:
            return self.landscape.basin_radius()["mean"]
        except (LandscapeFileError, ValueError) as err:
            logger.debug("SafetyGuard: no basin radius in the landscape (%s).", err)
            return None

    @property
    def aligned_asr(self) -> float:
        """The aligned model's ASR (%) on the prepared probe prompts."""
        return self.probe.baseline.asr if self.probe and self.probe.baseline else 0.0

    # -- steps ------------------------------------------------------------------------------------------
    @_timed
    def observe(self, step: int, values: Mapping[str, Any]) -> GuardDecision | None:
        """Halt on a non-finite training ``loss`` or ``grad_norm`` among ``values`` (a logger's
        entry); None when there is nothing to say."""
        self._require_begun()
        for key in ("loss", "grad_norm"):
            value = values.get(key)
            bad = isinstance(value, float | int) and not math.isfinite(value)
            if bad and self.state.halt_step is None:
                return self._halt(step, f"the training {key} is {value}", {})
        return None

    @_timed
    def step(self, step: int, loss: float | None = None) -> GuardDecision:
        """The cheap check after optimizer step ``step`` and, when due, a probe; what to do.

        Args:
            step: the number of optimizer steps taken (1 after the first).
            loss: the step's training loss (a non-finite loss halts).
        """
        self._require_begun()
        if loss is not None:
            decision = self.observe(step, {"loss": float(loss)})
            if decision is not None:
                return decision
        config = self.config
        if step % config.check_every and (config.probe_every is None or step % config.probe_every):
            return GuardDecision(step)
        model = self.model
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
        cosine = (
            sketch_cosine(sketch, self.state.memo.sketch)
            if self.state.memo and self.state.memo.sketch
            else None
        )
        growth = 0.0
        if not broken:
            self.state.history, growth = recent_growth(self.state.history, step, disp)
        self.state.check_seconds.append(time.perf_counter() - t0)
        record = CheckRecord(step, disp, cosine)
        metrics = {"safety/displacement": disp}
        radius = self.basin_radius
        if radius:
            metrics["safety/basin_ratio"] = disp / radius
        reason = None if broken else probe_due(step, disp, growth, cosine, self.state.memo, config)
        sentinel = not broken and reason is None and sentinel_due(step, self.state.memo)
        if broken or (
            (reason is not None or sentinel)
            # before moving the weights: a NaN the sketch did not sample
            and all_reduce_max([0.0 if trainable_finite(model) else 1.0])[0] > 0
        ):
            metrics["safety/status"] = float(HALT)
            self._record(record)
            return self._halt(step, "the weights are not finite (NaN or inf)", metrics)
        if sentinel:
            reason = self._sentinel(step, record)
        if reason is None:
            self._record(record)
            return GuardDecision(step, metrics=metrics)
        steps_left = (self.max_steps - step) if self.max_steps else None
        asked = horizon(steps_left, config, step, disp, growth, self.schedule)
        probed, decision = self._probe(step, disp, asked, growth)
        probed.reason, probed.cosine, probed.sentinel = reason, cosine, record.sentinel
        probed.sketch = encode_sketch(sketch)  # where the run went, for a path over a landscape
        record = probed
        metrics.update(probe_metrics(record, decision.status, self.aligned_asr, config.lookahead))
        stake = promise_at_stake(decision, asked, config)
        self.state.memo = ProbeMemo(
            step,
            disp,
            disp * decision.covered,
            [float(f"{v:.6g}") for v in sketch.tolist()],
            sentinels_of(record, self.config.sentinel_prompts),
            next_sentinel_step(step, at_stake=stake),
            stake,
            record.farthest,
            decision.deadline,
        )
        self._record(record)
        return self._act(decision, step, metrics)

    def _require_begun(self) -> None:
        if self.tracker is None:
            raise RuntimeError("Call Guard.begin() before the first Guard.step().")

    def _sentinel(self, step: int, record: CheckRecord) -> str | None:
        """Re-score the last probe's sentinel prompts at the lookahead point; a reason to probe
        when enough of them flipped (:mod:`~safety_guard.guard.cadence`)."""
        memo = self.state.memo
        start = time.perf_counter()
        multiple = memo.multiple if memo.multiple is not None else max(self.config.lookahead)
        with self._at(multiple):
            flips = sum(self.probe.flags(self.model, memo.sentinels))
        seconds = time.perf_counter() - start
        self.state.sentinel_seconds.append(seconds)
        memo.next_sentinel = next_sentinel_step(step, at_stake=memo.at_stake)
        record.sentinel = {"flips": flips, "of": len(memo.sentinels), "seconds": seconds}
        if flips < self.config.sentinel_flips:
            return None
        return (
            f"{flips} of the {len(memo.sentinels)} prompts nearest to flipping at the step-"
            f"{memo.step} probe flipped at θ₀ + {multiple:g}·δ"
        )

    @torch.no_grad()
    def _probe(
        self, step: int, displacement: float, horizon_multiple: float, growth: float = 0.0
    ) -> tuple[ProbeRecord, Decision]:
        """Measure, decide (:func:`~safety_guard.guard.confirmation.decide_probe`) at the horizon
        ``horizon_multiple`` and forecast (:mod:`~safety_guard.guard.forecast`); describe it."""
        start = time.perf_counter()
        model, probe = self.model, self.probe
        states: dict[float, StateMeasure] = {}

        def measure(s: float) -> Evidence:
            states[s] = probe.measure_along(model, self._at, s)
            return probe.evidence(states[s])

        def judged(s: float, indices: list[int]) -> dict[int, bool]:
            with self._at(s):
                return probe.confirm(model, states[s], indices)

        multiples = self.config.lookahead
        settled, _ = decide_probe(
            measure,
            lookahead_multiples(multiples, horizon_multiple) if displacement > 0 else [],
            probe.baseline.unsafe,  # grows in place as more prompts are prepared
            probe.baseline.live_flags(),
            horizon_multiple,
            self.settings,
            judged,
            self.config.batch_size * probe.probe.split()[1],
        )
        pace = (step, displacement, growth, self.schedule, self.max_steps)
        deadline = self.state.memo.deadline if self.state.memo is not None else None
        decision, eta = forecast_decision(
            settled.decision, settled.points, self.config, *pace, deadline
        )
        decision = agree(decision)  # every rank takes the same decision (all-reduced; make sure)
        seconds = time.perf_counter() - start
        self.state.probe_seconds.append(seconds)
        record = probe_record(step, displacement, settled, decision, states, seconds)
        forecast(record, decision, eta)
        return record, decision

    def _at(self, s: float) -> contextlib.AbstractContextManager[None]:
        """The model at θ₀ + s·δ inside the block (s = 1: as it is), restored exactly after."""
        return self.tracker.along(self.model, s) if s != 1.0 else contextlib.nullcontext()

    def _record(self, record: CheckRecord | ProbeRecord) -> None:
        self.state.records.append(record)
        if self.is_main and self.output_dir is not None:
            append_record(self.output_dir / "trajectory.jsonl", record.to_json())

    def _act(self, decision: Decision, step: int, metrics: dict[str, float]) -> GuardDecision:
        reasons = "; ".join(decision.reasons)
        if decision.status == OK:
            self.state.last_safe_step = step
            lora = self.tracker.kind == "lora"
            if lora:
                self._safe_adapter = adapter_copy(self.model)
            if self.config.keep_last_safe and (lora or self.config.keep_last_safe_full):
                save_last_safe(
                    self.model,
                    self.output_dir,
                    step,
                    sharded_lora=lora and self.tracker.sharded,
                    is_main=self.is_main,
                )
            return GuardDecision(step, probed=True, metrics=metrics)
        if decision.status == WARN:
            self.state.warn_count += 1
            if self.is_main:  # every rank took the same decision: say it once
                warnings.warn(f"SafetyGuard step {step}: {reasons}.", SafetyGuardWarning, 4)
            return GuardDecision(step, "warn", reasons, probed=True, metrics=metrics)
        return self._halt(step, reasons, metrics, probed=True)

    def _halt(
        self, step: int, reason: str, metrics: dict[str, float], *, probed: bool = False
    ) -> GuardDecision:
        restored = ""
        lora = self.tracker is not None and self.tracker.kind == "lora"
        if self.config.halt and self.config.restore_on_halt and lora and self._safe_adapter:
            load_adapter(self.model, self._safe_adapter)
            self.state.restored_step = self.state.last_safe_step or 0
            restored = f" The model holds the adapter of step {self.state.restored_step} again"
            restored += " (restore_on_halt)."
        self._log_warning(
            f"SafetyGuard step {step}: {reason}."
            + (" Halting training." if self.config.halt else " (halt disabled)")
            + (
                f" Last step a probe found within the promise: {self.state.last_safe_step}."
                if self.state.last_safe_step is not None
                else ""
            )
            + restored
        )
        if self.config.halt:
            self.state.halt_step, self.state.halt_reason = step, reason
        else:
            self.state.would_halt_count += 1
            if self.state.would_halt_step is None:
                self.state.would_halt_step, self.state.would_halt_reason = step, reason
        return GuardDecision(step, "halt", reason, self.config.halt, probed, metrics)

    def _log_warning(self, message: str, *values: Any) -> None:
        """A warning for the log, from the main process only (every rank sees the same); a log
        line, which no warning filter can hide."""
        if self.is_main:
            logger.warning(message, *values)

    # -- end --------------------------------------------------------------------------------------------
    @_timed
    def end(self) -> dict[str, Any]:
        """Write ``summary.json`` and ``trajectory.png`` (main process) and return the summary.

        Every rank waits here until the main process has written its files, so that no rank
        exits (and tears down the process group) while the main process is still plotting.
        """
        try:
            wall = time.perf_counter() - self._session_start
            if self.state.records and wall > 0:
                log_costs(self.state, self._session_seconds, wall)
            summary = self.summary()
            if self.is_main and self.output_dir is not None and self.state.records:
                write_run_files(
                    self.output_dir,
                    summary,
                    self.state.records,
                    self.settings,
                    self.landscape,
                )
        finally:
            barrier()
        return summary

    def summary(self) -> dict[str, Any]:
        """What the guard saw and did, for reports (also ``summary.json``)."""
        return {
            **self.state.summary(),
            "aligned_asr": self.aligned_asr,
            "num_prompts": self.probe.num_prompts if self.probe else None,
            "basin_radius": self.basin_radius,
            "horizon_counts": "steps" if self.schedule is None else "learning rate",
            "signal": self.settings.signal,
            "settings": self.settings.to_dict(),  # the promise and how it was kept
            "landscape": str(Path(self.landscape_path).resolve()) if self.landscape_path else None,
        }
