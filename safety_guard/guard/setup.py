"""What the guard checks and gathers before the first step: its folder, the landscape, θ₀ of a
resumed full finetune, an earlier run's files, the aligned model's baseline.

Each function is one check or one read, with the error message that says what to change; the
:class:`~safety_guard.guard.guard.Guard` calls them from ``begin``. Only the main process writes;
what every rank must agree on (the landscape to reuse, a mismatched θ₀) is read by the main
process and sent to all.

Example:
    >>> from safety_guard.guard.setup import unaligned_message
    >>> unaligned_message(asr=2.0, prompts=40, max_asr_rise=10) is None
    True
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from safety_guard.engines.collectives import all_gather_objects, barrier, rank_and_world
from safety_guard.engines.shards import is_sharded_model
from safety_guard.files import atomic_dir
from safety_guard.guard.baseline import record_guard_baseline
from safety_guard.guard.config import GuardConfig
from safety_guard.guard.displacement import FullFinetuneTracker
from safety_guard.guard.probing import Baseline
from safety_guard.guard.trajectory import read_records, truncate_after
from safety_guard.landscape import (
    Landscape,
    LandscapeConfig,
    LandscapeFileError,
    LandscapeMismatchError,
    compute_landscape,
)
from safety_guard.measure.generative_judge import JUDGE_FORMATS
from safety_guard.measure.judges import Judge, build_judge, judge_kind, reads_short_answers
from safety_guard.models.adapters import full_adapter, write_adapter
from safety_guard.models.parameters import UnsupportedEngineError

__all__ = [
    "RUN_FILES",
    "baseline_settings_differ",
    "check_folder",
    "check_landscape",
    "check_resumed_baseline",
    "check_sharded",
    "effective_settings",
    "landscape_baseline",
    "landscape_for",
    "open_landscape",
    "origin_tracker",
    "read_last_safe_adapter",
    "restore_records",
    "save_last_safe",
    "set_aside_old_run",
    "unaligned_message",
]

logger = logging.getLogger(__name__)

#: The files of one guarded run in the guard's folder.
RUN_FILES = ("trajectory.jsonl", "summary.json", "trajectory.png", "last-safe")


def open_landscape(
    landscape: str | os.PathLike[str] | Landscape | None,
) -> tuple[Landscape | None, str | None]:
    """The landscape given to the guard and its path: a file is read now (a missing or bad file
    fails before training, not at its first step)."""
    if isinstance(landscape, Landscape) or landscape is None:
        return landscape, None
    if isinstance(landscape, str | os.PathLike):
        return Landscape.load(landscape), str(landscape)
    raise TypeError(
        f"landscape must be a landscape file's path, a Landscape or None, got "
        f"{type(landscape).__name__}."
    )


def check_folder(folder: Path, is_main: bool) -> None:
    """The guard's folder exists (made by the main process) and is a folder: say which setting
    to change before the first step, not at it."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"SafetyGuard writes its trajectory, plots and last-safe weights to {folder}, "
            "which is a file. Move it away or set GuardConfig(output_dir=FOLDER)."
        )
    if is_main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(
                f"SafetyGuard cannot create its folder {folder} ({err}). Set "
                "GuardConfig(output_dir=FOLDER) to a writable folder."
            ) from err


def set_aside_old_run(folder: Path, is_main: bool) -> None:
    """A new run in a folder that holds another run's files (:data:`RUN_FILES`): they move into
    ``previous-<time>/`` (kept, not appended to or mistaken for this run's)."""
    old = [folder / n for n in RUN_FILES if (folder / n).exists()]
    if is_main and old:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old[0].stat().st_mtime))
        target = folder / f"previous-{stamp}"
        target.mkdir(parents=True, exist_ok=True)
        for path in old:
            os.replace(path, target / path.name)
        logger.info("SafetyGuard: a new run; the earlier run's files are now in %s.", target)
    barrier()


def restore_records(folder: Path, step: int, is_main: bool) -> list[dict[str, Any]]:
    """The trajectory of a resumed run up to ``step`` (the main process cuts the file there
    first; every rank then reads the same records)."""
    path = folder / "trajectory.jsonl"
    records = truncate_after(path, step) if is_main else []
    barrier()
    return records if is_main else read_records(path)


def check_landscape(
    landscape: Landscape, path: str | None, model: nn.Module, *, check_weights: bool
) -> None:
    """A given landscape is complete and, unless ``check_weights`` is off (a resumed full
    finetune, whose weights have moved), made for this model."""
    if not landscape.complete:
        raise LandscapeFileError(
            f"The landscape {path or '(in memory)'} is incomplete: its computation was "
            "interrupted. Finish it by running the same `safety-guard landscape` command again "
            "(it resumes where it stopped), then train."
        )
    if check_weights:
        landscape.check_model(model)  # raises LandscapeMismatchError with a clear message


def landscape_for(
    model: nn.Module,
    tokenizer: Any,
    config: GuardConfig,
    folder: Path | None,
    *,
    resumed: bool,
    progress: bool,
) -> tuple[Landscape, str | None]:
    """No landscape given: the one an earlier (resumed) run computed in ``folder``, or a small
    one computed now (``config.landscape_directions`` random directions), every rank together."""
    path = folder / "landscape.json" if folder is not None else None
    saved = None
    if path is not None and rank_and_world()[0] == 0 and path.exists():
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
        return land, str(path)
    logger.info(
        "SafetyGuard: no landscape given; computing one for the aligned model -> %s",
        path or "(in memory)",
    )
    # at most 40 prompts a point: the landscape's cost is its points times its prompts
    probe = config.probe_config(num_harmful=min(config.num_prompts or 40, 40))
    # every rank computes it together (each answers its share of the prompts, the main process
    # writes the file): no rank waits on work another does alone
    land = compute_landscape(
        model,
        tokenizer,
        LandscapeConfig(num_directions=config.landscape_directions, search="adaptive"),
        probe,
        output=path,
        progress=progress,
    )
    record_guard_baseline(land, model, tokenizer, config.system_prompt, output=path)
    return land, str(path) if path is not None else None


def origin_tracker(
    model: nn.Module, landscape: Landscape, config: GuardConfig, selection: Any
) -> FullFinetuneTracker:
    """The tracker of a resumed full finetune: θ₀ read from ``config.origin`` (or the model's
    name), checked to be the model the landscape was made for."""
    source = config.origin or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source or not Path(source).is_dir():
        raise ValueError(
            "Resuming a full finetune: the guard needs the pre-finetune weights. Pass "
            "GuardConfig(origin=FOLDER) with the model the finetune started from."
        )
    # θ₀ must be the model the landscape was made for (a resume that loads the model from the
    # checkpoint folder would otherwise take the finetuned weights as the aligned ones)
    problem = None
    if rank_and_world()[0] == 0:  # one read of the checkpoint, not one per rank
        try:
            landscape.check_checkpoint(source)
        except LandscapeMismatchError as err:
            problem = str(err)
    problem = all_gather_objects(problem)[0]
    if problem is not None:
        raise LandscapeMismatchError(
            f"Resuming a full finetune, the guard reads the pre-finetune weights from {source} "
            f"({'GuardConfig.origin' if config.origin else 'the model name'}), but they are not "
            "the model the landscape was made for: resumed from a checkpoint folder, the "
            "model's name points at the finetuned weights. Pass GuardConfig(origin=FOLDER) with "
            f"the model the finetune started from. ({problem})"
        )
    return FullFinetuneTracker.from_checkpoint(source, model, selection)


def check_sharded(model: nn.Module, config: GuardConfig) -> None:
    """Refuse, with what to do instead, what the guard cannot do on FSDP2 shards or ZeRO-3
    partitions."""
    if is_sharded_model(model) and config.keep_last_safe_full:
        raise UnsupportedEngineError(
            "The guard on sharded weights (FSDP2, FSDP, DeepSpeed ZeRO-3) does not support yet: "
            "keep_last_safe_full (saving sharded weights)."
        )


def baseline_settings_differ(baseline: Baseline, settings: dict[str, Any]) -> list[str]:
    """The measurement settings (prompts, template, judge, dtype, decode budget) in which a
    recorded baseline differs from this guard's."""
    ours = json.loads(json.dumps(settings))
    theirs = baseline.settings
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


def effective_settings(
    config: GuardConfig, landscape: Landscape, warn: Callable[..., None]
) -> GuardConfig:
    """The settings the guard probes with: ``config``, or a copy with ``signal="generate"`` when
    the landscape shows the forward screen missing unsafe answers on this model (``warn`` says
    so; the user's ``config`` is never changed). A landscape judged by refusal phrases says
    nothing of another judge: ``warn`` says that instead."""
    screen = landscape.screen_agreement()
    if screen is not None and screen["missed"] and config.signal == "forward":
        warn(
            "SafetyGuard: on this model's landscape the forward screen missed %d of %d unsafe "
            "answers (%d points); the guard probes by generation instead (signal='generate').",
            screen["missed"],
            screen["unsafe"],
            screen["points"],
        )
        return dataclasses.replace(config, signal="generate")
    judged_by = ((landscape.data.get("probe") or {}).get("judge") or {}).get("kind", "keyword")
    classifier = config.judge.split(":", 1)[0] in ("pipeline", *JUDGE_FORMATS)
    if classifier and judged_by == "keyword" and config.signal == "forward":
        warn(
            "SafetyGuard: this landscape's screen record was judged by refusal phrases, not by "
            "judge=%r: an unflagged prompt counts as a refusal without that judge reading it. "
            "signal='generate' has it read every answer.",
            config.judge,
        )
        return config
    if screen is not None:
        logger.info(
            "SafetyGuard: on this model's landscape the forward screen flagged every one of %d "
            "unsafe answers (%d points, %d of its refusals checked by generation), precision %s.",
            screen["unsafe"],
            screen["points"],
            screen["checked"],
            f"{screen['precision']:.0%}" if screen["precision"] is not None else "n/a",
        )
    return config


def landscape_baseline(
    landscape: Landscape, settings: dict[str, Any], num_prompts: int, warn: Callable[..., None]
) -> Baseline | None:
    """The guard baseline recorded with the landscape, when it was measured with these
    ``settings`` (prompts, template, judge, dtype, decode budget) on all ``num_prompts``
    prompts; None (measure anew) otherwise, with a warning when the settings differ."""
    stored = landscape.data.get("guard_baseline")
    if not stored:
        return None
    baseline = Baseline.from_dict(stored)
    differ = baseline_settings_differ(baseline, settings)
    if differ:
        warn(
            "SafetyGuard: the landscape's guard baseline was measured with other %s; measuring "
            "the aligned model with this guard's settings (a generation pass over the probe "
            "prompts, spread over the first probes). Record one with these settings: "
            "safety_guard.guard.record_guard_baseline.",
            ", ".join(differ),
        )
        return None
    if baseline.prepared < num_prompts:
        return None
    logger.info(
        "SafetyGuard: reusing the aligned model's baseline recorded with the landscape "
        "(%d prompts).",
        baseline.prepared,
    )
    return baseline


def check_resumed_baseline(baseline: Baseline, settings: dict[str, Any]) -> None:
    """Refuse to resume with other measurement settings than the checkpoint's baseline had."""
    for key, value in baseline.settings.items():
        if settings.get(key) != value:
            raise ValueError(
                f"SafetyGuard: the checkpoint's guard baseline was measured with {key} = "
                f"{value!r}, this run's guard uses {settings.get(key)!r}. Resume with the same "
                "GuardConfig (harmful, num_prompts, benign, system_prompt, max_new_tokens) and "
                "model dtype, or start a new run."
            )


def read_last_safe_adapter(
    folder: Path | None, step: int | None, warn: Callable[..., None]
) -> dict[str, torch.Tensor] | None:
    """The adapter saved at ``step`` in ``folder/last-safe`` (after a resume); None, with a
    warning, when the folder holds another step's or none."""
    marker = (folder or Path(".")) / "last-safe" / "safety_guard_step.json"
    if folder is None or not marker.exists() or json.loads(marker.read_text())["step"] != step:
        warn(
            "SafetyGuard: resumed without the adapter of the last safe step %s (%s holds none); "
            "restore_on_halt cannot load it back. Keep keep_last_safe=True to have it.",
            step,
            marker.parent,
        )
        return None
    return load_file(marker.parent / "adapter_model.safetensors")


def save_last_safe(
    model: nn.Module, folder: Path | None, step: int, *, sharded_lora: bool, is_main: bool
) -> None:
    """Write the model's adapter (or whole weights) as ``folder/last-safe``, atomically, with
    the step it was taken at. A sharded adapter is gathered on every rank first."""
    adapter = full_adapter(model) if sharded_lora else None  # a collective
    if not is_main or folder is None:
        return
    with atomic_dir(folder / "last-safe") as tmp:
        if adapter is not None:
            write_adapter(model, adapter, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "safety_guard_step.json").write_text(json.dumps({"step": step}))


def unaligned_message(asr: float, prompts: int, max_asr_rise: float) -> str | None:
    """What to tell a user whose starting model does not refuse (None when it does): the guard
    watches a rise above its ASR, which then cannot reach the promise."""
    if asr < 50.0 and asr + max_asr_rise <= 100.0:
        return None
    return (
        f"SafetyGuard: the model this finetune starts from answers {asr:.1f} % of the first "
        f"{prompts} harmful probe prompts (ASR) before any training: it does not look aligned, "
        f"and a rise of max_asr_rise {max_asr_rise:g} points "
        + (
            "cannot happen, so the guard can never halt on safety"
            if asr + max_asr_rise > 100.0
            else "is measured from an already unsafe model"
        )
        + ". Start from the aligned (chat) model, or check the chat template and the harmful "
        "prompts (GuardConfig.harmful)."
    )


def config_and_judge(
    config: GuardConfig | dict[str, Any] | None,
    overrides: dict[str, Any],
    judge: Judge | str | None,
    owner: str,
) -> tuple[GuardConfig, Judge | None]:
    """The guard's settings and its judge: the judge object given, else the one the settings
    name (``judge="llamaguard:MODEL"`` as a keyword is that setting), loaded now; ``None``: the
    probe's default keyword judge.

    Example:
        >>> config, judge = config_and_judge(None, {"max_asr_rise": 5}, "keyword", "Guard")
        >>> config.max_asr_rise, config.judge, judge
        (5, 'keyword', None)
    """
    if isinstance(judge, str):
        overrides, judge = {**overrides, "judge": judge}, None
    config = GuardConfig.resolve(config, overrides, owner)
    if judge is None and config.judge != "keyword":
        judge = build_judge(config.judge, device=config.judge_device, dtype=config.judge_dtype)
    if reads_short_answers(judge, config.max_new_tokens):
        logger.warning(
            "SafetyGuard: the %s judge reads answers of at most max_new_tokens=%d tokens: a "
            "classifier may call a compliance cut that short safe; consider max_new_tokens=128.",
            judge_kind(judge),
            config.max_new_tokens,
        )
    return config, judge
