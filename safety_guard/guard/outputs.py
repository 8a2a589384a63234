"""The files a guarded run leaves at its end: ``summary.json`` and ``trajectory.png``.

Written by the main process, atomically; a plot that cannot be drawn (no matplotlib, a full
disk) is a warning, never a failed run.

Example:
    >>> from safety_guard.guard.records import CheckRecord
    >>> plot_rows([CheckRecord(step=3, displacement=0.1, cosine=None)], lookahead=(2.0,))
    [{'step': 3, 'displacement': 0.1, 'asr': None, 'lookahead': {}, 'event': None}]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safety_guard._extras import MissingExtraError
from safety_guard.files import atomic_write_text
from safety_guard.guard.records import CheckRecord, ProbeRecord
from safety_guard.guard.state import GuardState
from safety_guard.landscape import Landscape
from safety_guard.plots import plot_trajectory, require_matplotlib

__all__ = ["log_costs", "plot_rows", "write_run_files"]

logger = logging.getLogger(__name__)


def plot_rows(
    records: Sequence[CheckRecord | ProbeRecord], lookahead: Sequence[float]
) -> list[dict[str, Any]]:
    """The trajectory records as the rows :func:`~safety_guard.plots.plot_trajectory` draws:
    points capped at the horizon near the end make one ``"horizon"`` series, not one legend entry
    per multiple."""
    rows = []
    for r in records:
        probe = r if isinstance(r, ProbeRecord) else None
        points = probe.points if probe else {}
        rows.append(
            {
                "step": r.step,
                "displacement": r.displacement,
                "asr": probe.asr if probe else None,
                "lookahead": {
                    (f"{s:g}" if s in lookahead else "horizon"): p.asr
                    for s, p in points.items()
                    if s != 1.0
                },
                "event": probe.status if probe and probe.status in ("warn", "halt") else None,
            }
        )
    return rows


def write_run_files(
    folder: Path,
    summary: dict[str, Any],
    records: Sequence[CheckRecord | ProbeRecord],
    lookahead: Sequence[float],
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
        plot_trajectory(plot_rows(records, lookahead), path, landscape=landscape)
    except (OSError, ValueError, RuntimeError) as err:  # a plot must not fail a finished run
        logger.warning("SafetyGuard: could not write the trajectory plot %s: %s", path, err)


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
