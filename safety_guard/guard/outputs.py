"""The files a guarded run leaves at its end: ``summary.json`` and ``trajectory.png``.

Written by the main process, atomically; a plot that cannot be drawn (no matplotlib, a full
disk) is a warning, never a failed run.

Example:
    >>> from safety_guard.guard.records import CheckRecord
    >>> plot_rows([CheckRecord(step=3, displacement=0.1, cosine=None)], (2.0,), 1.0)
    [{'step': 3, 'displacement': 0.1, 'rise': None, 'lookahead': {}, 'eta_steps': None, 'event': None}]
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safety_guard._extras import MissingExtraError
from safety_guard.files import atomic_write_text
from safety_guard.guard.config import GuardConfig
from safety_guard.guard.records import CheckRecord, ProbeRecord
from safety_guard.guard.state import GuardState
from safety_guard.landscape import Landscape
from safety_guard.plots import plot_trajectory, require_matplotlib

__all__ = [
    "log_costs",
    "plot_rows",
    "plot_run",
    "plot_run_folder",
    "plot_run_path",
    "write_run_files",
]

logger = logging.getLogger(__name__)


def plot_rows(
    records: Sequence[CheckRecord | ProbeRecord], lookahead: Sequence[float], confidence_z: float
) -> list[dict[str, Any]]:
    """The trajectory records as the rows :func:`~safety_guard.plots.plot_trajectory` draws:
    each point ahead's rise and lower bound (rise − ``confidence_z``·se); points capped at the
    horizon near the end make one ``"horizon"`` series, not one legend entry per multiple."""
    rows = []
    for r in records:
        probe = r if isinstance(r, ProbeRecord) else None
        points = probe.points if probe else {}
        rows.append(
            {
                "step": r.step,
                "displacement": r.displacement,
                "rise": probe.rise if probe else None,
                "lookahead": {
                    (f"{s:g}" if s in lookahead else "horizon"): {
                        "rise": p.rise,
                        "lower": p.rise - confidence_z * p.se,
                        "multiple": s,
                    }
                    for s, p in points.items()
                    if s != 1.0
                },
                "eta_steps": probe.eta_steps if probe else None,
                "event": probe.status if probe and probe.status in ("warn", "halt") else None,
            }
        )
    return rows


def write_run_files(
    folder: Path,
    summary: dict[str, Any],
    records: Sequence[CheckRecord | ProbeRecord],
    config: GuardConfig,
    landscape: Landscape | None,
) -> None:
    """``folder/summary.json`` and, with matplotlib, ``folder/trajectory.png``."""
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=1))
    path = folder / "trajectory.png"
    try:
        require_matplotlib()
    except MissingExtraError as err:
        logger.warning("SafetyGuard: no trajectory plot %s: %s", path, err)
        return
    try:
        plot_run(records, summary, config, path, landscape)
    except (OSError, ValueError, RuntimeError) as err:  # a plot must not fail a finished run
        logger.warning("SafetyGuard: could not write the trajectory plot %s: %s", path, err)


def _halt_of(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The halt a run's summary records (with ``halt=False``, the one it would have taken:
    ``monitor``), or None."""
    if summary.get("halt_step") is not None:
        return {
            "step": summary["halt_step"],
            "reason": summary.get("halt_reason"),
            "restored": summary.get("restored_step"),
        }
    if summary.get("would_halt_step") is not None:  # halt=False: what it would have done
        return {
            "step": summary["would_halt_step"],
            "reason": summary.get("would_halt_reason"),
            "monitor": True,
        }
    return None


def _run_summary(folder: Path) -> dict[str, Any]:
    """The ``summary.json`` of a guarded run's folder, which must hold its trajectory too."""
    for name in ("trajectory.jsonl", "summary.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} holds no {name}: is it a guarded run's folder?")
    return json.loads((folder / "summary.json").read_text())


def plot_run(
    records: Sequence[CheckRecord | ProbeRecord],
    summary: dict[str, Any],
    config: GuardConfig,
    path: str | Path,
    landscape: Landscape | None = None,
) -> Path:
    """The trajectory plot of a guarded run: its records against the promise, with the halt,
    its reason and the adapter put back (from ``summary``).

    Example:
        >>> plot_run(records, guard.summary(), guard.settings, "trajectory.png")  # doctest: +SKIP
        PosixPath('trajectory.png')
    """
    halt = _halt_of(summary)
    title = None
    if halt is None:
        title = (
            f"guarded finetune: no halt ({summary.get('probes', 0)} probes, "
            f"{summary.get('warn_count', 0)} warnings)"
        )
    rows = plot_rows(records, config.lookahead, config.confidence_z)
    return plot_trajectory(
        rows, path, promise=config.max_asr_rise, halt=halt, landscape=landscape, title=title
    )


def plot_run_folder(folder: str | Path, output: str | Path | None = None) -> Path:
    """Redraw the plot of a guarded run from its folder (``trajectory.jsonl``, ``summary.json``
    and the landscape file it names, when it exists); writes ``output`` (default:
    ``folder/trajectory.png``).

    Raises:
        FileNotFoundError: the folder holds no trajectory or summary.

    Example:
        >>> plot_run_folder("outputs/demo/harmful-lora/safety-guard")  # doctest: +SKIP
        PosixPath('outputs/demo/harmful-lora/safety-guard/trajectory.png')
    """
    from safety_guard.guard.records import record_from_json
    from safety_guard.guard.trajectory import read_records

    folder = Path(folder)
    summary = _run_summary(folder)
    settings = summary.get("settings")
    if not isinstance(settings, dict):
        logger.warning(
            "%s records no settings (written by an earlier safety-guard): the plot draws the "
            "promise and the bounds of GuardConfig()'s defaults.",
            folder / "summary.json",
        )
        settings = {}
    known = {f.name for f in dataclasses.fields(GuardConfig)}
    config = GuardConfig.from_dict({k: v for k, v in settings.items() if k in known})
    records = [record_from_json(r) for r in read_records(folder / "trajectory.jsonl")]
    landscape = None
    named = summary.get("landscape")
    if named and Path(named).is_file():
        landscape = Landscape.load(named)
    elif named:
        logger.warning("The run's landscape %s is not there: no basin radius on the plot.", named)
    return plot_run(records, summary, config, output or folder / "trajectory.png", landscape)


def plot_run_path(
    folder: str | Path,
    landscape: str | Path,
    output: str | Path,
    target_step: int | None = None,
) -> Path:
    """Draw a guarded run's path over a 2D landscape spanned by its finetune direction
    (:mod:`safety_guard.guard.path`): ``landscape`` from ``safety-guard landscape --direction
    interpolation --target FOLDER/last-safe --dims 2``; ``target_step`` the step whose state is
    its α = 1 (default: read beside the target, ``safety_guard_step.json``).

    Example:
        >>> plot_run_path("outputs/demo/harmful-lora/safety-guard", "path.json", "path.png")  # doctest: +SKIP
        PosixPath('path.png')
    """
    from safety_guard.guard.path import landscape_target_step, run_path
    from safety_guard.guard.trajectory import read_records
    from safety_guard.plots import plot_path

    folder = Path(folder)
    summary = _run_summary(folder)
    land = Landscape.load(landscape)
    found = landscape_target_step(land, landscape)
    if target_step is None and found is None:
        raise ValueError(
            "The landscape's target records no guard step (no safety_guard_step.json beside "
            "it): pass --target-step, the step whose weights the target holds."
        )
    step = target_step if target_step is not None else found
    path = run_path(read_records(folder / "trajectory.jsonl"), step)
    halt = _halt_of(summary)
    return plot_path(
        land,
        path,
        output,
        halt=halt["step"] if halt else None,
        restored=summary.get("restored_step"),
        target_step=step,
    )


def log_costs(state: GuardState, session_seconds: float, wall: float) -> None:
    """Log what the guard took of this process's training time."""
    logger.info(
        "SafetyGuard: %d probes, %d sentinel checks, %d cheap checks (%.1f s in all); in this "
        "process %.1f s, %.1f %% of its %.1f s of training.",
        len(state.probe_seconds),
        len(state.sentinel_seconds),
        len(state.check_seconds),
        state.total_seconds,
        session_seconds,
        100 * session_seconds / wall,
        wall,
    )
