"""The safety ETA: at the run's current pace, how many steps until the promise breaks.

A probe measures the rise of the ASR along the finetune's line, θ₀ + s·δ, at the current model
(s = 1) and ahead (s = 2, or the horizon). The promise breaks where the rise's lower confidence
bound reaches ``max_asr_rise``: at the multiple s* where the bound, linear between the measured
multiples, crosses it. The weights get there when the displacement has grown by (s* − 1) times
itself; at the pace the run has moved so far (:func:`~safety_guard.guard.rule.pace`, per step, or
per unit of learning rate with the run's schedule) that takes the learning rate the next steps
spend. No line is extrapolated past the farthest measured point: a break beyond it is not in
sight, and one the remaining steps cannot reach is not forecast either.

Example:
    >>> from safety_guard.guard import GuardConfig
    >>> from safety_guard.guard.rule import PointEstimate
    >>> points = {1.0: PointEstimate(8.0, 3.0, 1.0), 2.0: PointEstimate(25.0, 20.0, 2.0)}
    >>> crossing_multiple(points, GuardConfig())  # the bound 2 at s = 1, 18 at s = 2
    1.5
    >>> eta_steps(points, GuardConfig(), step=40, displacement=0.02)  # 0.5·δ at 0.0005 / step
    20
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

from safety_guard.guard.config import GuardConfig
from safety_guard.guard.records import ProbeRecord
from safety_guard.guard.rule import WARN, Decision, PointEstimate, pace
from safety_guard.guard.schedule import LrSchedule

__all__ = ["crossing_multiple", "eta_steps", "forecast"]


def crossing_multiple(points: Mapping[float, PointEstimate], config: GuardConfig) -> float | None:
    """The multiple s ≥ 1 of δ where the rise's lower bound (``confidence_z`` standard errors)
    first reaches ``max_asr_rise``, linear between the measured multiples; 1.0 when the current
    model is past it already, None when no measured point is (or a point is not finite)."""
    limit, z = config.max_asr_rise, config.confidence_z
    line = sorted((s, p) for s, p in points.items() if s >= 1.0)
    if not line or any(not p.finite for _, p in line):
        return None
    s0, p0 = line[0]
    if p0.lower(z) >= limit:
        return s0
    for (s0, p0), (s1, p1) in itertools.pairwise(line):
        lo, hi = p0.lower(z), p1.lower(z)
        if hi >= limit:
            return s0 + (s1 - s0) * (limit - lo) / (hi - lo)
    return None


def eta_steps(
    points: Mapping[float, PointEstimate],
    config: GuardConfig,
    step: int,
    displacement: float,
    growth: float = 0.0,
    schedule: LrSchedule | None = None,
    max_steps: int | None = None,
) -> int | None:
    """Steps from ``step`` until the promise breaks at the current pace; 0 when it is broken
    now, None when no break is in sight (no measured point past the promise, no pace to
    project from, or the run ends first).

    Args:
        points: the probe's estimates per multiple of δ (1.0: the current model).
        config: ``max_asr_rise`` and ``confidence_z``.
        step: the probe's step; ``displacement``: the displacement then.
        growth: the displacement's recent growth per step.
        schedule: the run's learning-rate schedule (None: steps count, constant rate).
        max_steps: the run's last step (None: unknown, no end).
    """
    s = crossing_multiple(points, config)
    if s is None:
        return None
    if s <= 1.0:
        return 0
    rate = pace(step, displacement, growth, schedule)
    if rate is None or rate <= 0.0:
        return None
    needed = (s - 1.0) / rate  # steps, or learning rate with a schedule
    if schedule is not None:
        return schedule.steps_to_spend(step, needed)
    steps = max(1, math.ceil(needed - 1e-9))
    return None if max_steps is not None and step + steps > max_steps else steps


def forecast(
    record: ProbeRecord,
    decision: Decision,
    config: GuardConfig,
    growth: float = 0.0,
    schedule: LrSchedule | None = None,
    max_steps: int | None = None,
) -> None:
    """Set ``record.eta_steps`` (:func:`eta_steps` at the record's step and displacement) and,
    on a warning, say it among the decision's reasons and the record's.
    Every rank holds the same all-reduced estimates, so every rank says the same."""
    record.eta_steps = eta_steps(
        record.estimates(), config, record.step, record.displacement, growth, schedule, max_steps
    )
    if decision.status == WARN and record.eta_steps:
        decision.reasons.append(
            f"at this pace the promise breaks in about {record.eta_steps} steps"
        )
        record.reasons = decision.reasons
