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

import dataclasses
import itertools
import math
from collections.abc import Mapping

from safety_guard.engines.collectives import all_reduce_max
from safety_guard.guard.config import GuardConfig
from safety_guard.guard.records import ProbeRecord
from safety_guard.guard.rule import HALT, WARN, Decision, PointEstimate, pace
from safety_guard.guard.schedule import LrSchedule

__all__ = [
    "agree",
    "crossing_multiple",
    "deferred",
    "eta_steps",
    "forecast",
    "forecast_decision",
]


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


def deferred(
    decision: Decision,
    points: Mapping[float, PointEstimate],
    step: int,
    eta: int | None,
    config: GuardConfig,
    *,
    beyond_end: bool = False,
    previous_deadline: int | None = None,
) -> Decision:
    """``decision``, or a warning in its place while ``config.halt_within`` defers its halt.

    A halt is deferred when it rests on the line ahead only (the current model finite, its
    capability intact, its rise and that rise's lower bound within the promise) and the break
    is more than ``halt_within`` steps away at the run's pace, or beyond the run's end
    (``beyond_end``: ``eta`` None although the run's pace is known). The warning carries a
    ``deadline``, the last check step by which the break would be ``halt_within`` steps away:
    the cadence probes there (:func:`~safety_guard.guard.cadence.probe_due`), and that probe
    halts if the line is still past; a deadline never moves later (``previous_deadline``), and a
    probe at or after it defers nothing. A break beyond the run's end has no deadline: the
    cadence probes again before the model reaches the distance the probe covered. A farther
    break is never halted sooner than a nearer one.

    Example:
        >>> from safety_guard.guard.rule import decide
        >>> cfg = GuardConfig(halt_within=10)
        >>> points = {1.0: PointEstimate(8.0, 3.0, 1.0), 2.0: PointEstimate(25.0, 20.0, 2.0)}
        >>> halt = decide(points, 2.0, cfg)
        >>> warn = deferred(halt, points, step=40, eta=25, config=cfg)
        >>> warn.status_name, warn.deadline
        ('warn', 55)
        >>> deferred(halt, points, step=40, eta=8, config=cfg).status_name
        'halt'
        >>> deferred(halt, points, step=55, eta=25, config=cfg, previous_deadline=55).status_name
        'halt'
    """
    within, limit = config.halt_within, config.max_asr_rise
    current = points.get(1.0)
    ahead_only = (
        decision.status == HALT
        and current is not None
        and current.finite
        and current.rise < limit
        and current.lower(config.confidence_z) < limit
        and (current.nll_rise is None or current.nll_rise <= config.nll_tolerance)
        and crossing_multiple(points, config) is not None
    )
    if (
        within is None
        or not ahead_only
        or (previous_deadline is not None and step >= previous_deadline)
    ):
        return decision
    if eta is None:
        if not beyond_end:  # no pace to project from: nothing says the break is far
            return decision
        deadline, when = previous_deadline, "beyond the run's end at this pace"
    else:
        if eta <= within:
            return decision
        deadline = step + eta - within
        deadline -= deadline % config.check_every  # a step the guard checks
        if previous_deadline is not None:
            deadline = min(deadline, previous_deadline)
        if deadline <= step:
            return decision
        when = f"in about {eta} steps"
    then = (
        f"a probe at step {deadline} halts if the line ahead is still past the promise"
        if deadline is not None
        else "the guard probes again before the model reaches the distance this probe covered"
    )
    return dataclasses.replace(
        decision,
        status=WARN,
        deadline=deadline,
        reasons=[
            *decision.reasons,
            f"the promise breaks {when} (> halt_within {within}): a warning now; {then}",
        ],
    )


def forecast_decision(
    decision: Decision,
    points: Mapping[float, PointEstimate],
    config: GuardConfig,
    step: int,
    displacement: float,
    growth: float = 0.0,
    schedule: LrSchedule | None = None,
    max_steps: int | None = None,
    previous_deadline: int | None = None,
) -> tuple[Decision, int | None]:
    """The safety ETA of a probe (:func:`eta_steps`) and its decision after ``halt_within``
    (:func:`deferred`; ``previous_deadline``: the deadline the last probe set, if any).

    Example:
        >>> from safety_guard.guard.rule import decide
        >>> cfg = GuardConfig(halt_within=5)
        >>> points = {1.0: PointEstimate(8.0, 3.0, 1.0), 2.0: PointEstimate(25.0, 20.0, 2.0)}
        >>> d, eta = forecast_decision(decide(points, 2.0, cfg), points, cfg, 40, 0.02)
        >>> d.status_name, eta, d.deadline  # the break 20 steps away: probe again at 55
        ('warn', 20, 55)
    """
    eta = eta_steps(points, config, step, displacement, growth, schedule, max_steps)
    known_pace = pace(step, displacement, growth, schedule) is not None
    decision = deferred(
        decision,
        points,
        step,
        eta,
        config,
        beyond_end=eta is None and known_pace,
        previous_deadline=previous_deadline,
    )
    return decision, eta


def agree(decision: Decision) -> Decision:
    """The decision every rank takes: the most severe status of any rank, the earliest
    deadline (none on a halt). Every rank holds the same all-reduced estimates, so they agree
    already; this makes sure (a no-op in one process).

    Example:
        >>> from safety_guard.guard.rule import decide
        >>> ok = decide({1.0: PointEstimate(5.0, 0.0, 0.5)}, 1.0, GuardConfig())
        >>> agree(ok) is ok
        True
    """
    far = math.inf if decision.deadline is None else float(decision.deadline)
    status, neg_deadline = all_reduce_max([float(decision.status), -far])
    status, deadline = int(status), None if neg_deadline == -math.inf else int(-neg_deadline)
    deadline = None if status == HALT else deadline  # a halt is decided: nothing deferred
    if status == decision.status and deadline == decision.deadline:
        return decision
    reasons = [*decision.reasons, "another rank decided so"]
    return dataclasses.replace(decision, status=status, deadline=deadline, reasons=reasons)


def forecast(record: ProbeRecord, decision: Decision, eta: int | None) -> None:
    """Set ``record.eta_steps`` to ``eta`` (:func:`eta_steps` at the record's step and
    displacement) and, on a warning, say it among the decision's reasons and the record's.

    Example:
        >>> forecast(record, decision, eta=12)  # doctest: +SKIP
        >>> record.eta_steps, decision.reasons[-1]  # doctest: +SKIP
        (12, 'at this pace the promise breaks in about 12 steps')
    """
    record.eta_steps = eta
    if decision.status == WARN and eta and decision.deadline is None:  # a deferral says it
        decision.reasons.append(f"at this pace the promise breaks in about {eta} steps")
        record.reasons = decision.reasons
