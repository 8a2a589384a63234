"""When the guard probes: as the lookahead stops covering the finetune, not every N steps.

A probe at displacement d that finds the line θ₀ + s·δ within the promise up to the multiple
s_c (see :func:`covered_multiple`) vouches for every model on that line up to s_c·d. As long
as the finetune keeps its direction, the models it passes through on the way there are
(approximately) those points, so the guard need not look again until

* the displacement is about to pass s_c·d (predicted at the next cheap check from its growth),
* or δ has turned away from the probed direction (cosine of cheap sketches of δ below
  ``min_cosine``),
* or the step is twice the last probe's step (a finetune whose displacement stalls can still
  turn harmful: a poisoned LoRA finetune of the damage suite did),
* or ``max_probe_interval`` steps have passed.

With the default lookahead (2×), probes follow the doublings of the displacement and of the
step: often early in a run, when models break fastest, and rarely later. ``probe_every``
restores a fixed cadence.
The rule is a pure function of numbers the callback records, so it can be tested on synthetic
trajectories and replayed on saved ones.

Example:
    >>> from safety_guard.guard import GuardConfig
    >>> cfg = GuardConfig()
    >>> last = ProbeMemo(step=4, displacement=1e-4, covered=2e-4)
    >>> probe_due(5, 1.2e-4, 2e-5, 1.0, last, cfg) is None  # 1.2e-4 + 2e-5 < 2e-4: covered
    True
    >>> probe_due(9, 1.9e-4, 2e-5, 1.0, last, cfg)
    'the displacement 0.00021 at the next check passes the 0.0002 the last probe covered'
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import GuardConfig

__all__ = ["ProbeMemo", "covered_multiple", "probe_due"]


@dataclass
class ProbeMemo:
    """What the last probe leaves for the cadence rule.

    Attributes:
        step: the probe's global step.
        displacement: the displacement d it probed at.
        covered: the displacement up to which the probed line stayed within the promise.
        sketch: a cheap sketch of δ at the probe (for the direction cosine), or ``None``.
    """

    step: int
    displacement: float
    covered: float
    sketch: list[float] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeMemo:
        return cls(
            **{k: data[k] for k in ("step", "displacement", "covered", "sketch") if k in data}
        )


def covered_multiple(rises: Mapping[float, float], limit: float) -> float:
    """The largest multiple s up to which the estimated rise stays below ``limit``.

    ``rises`` maps probed multiples (1 = the current model) to estimated ASR rises (points);
    between them the rise is interpolated linearly. 1.0 when the current model is already at
    ``limit``; the largest probed multiple when every probed point is below it.

    Example:
        >>> covered_multiple({1.0: 2.0, 2.0: 18.0}, 10.0)
        1.5
        >>> covered_multiple({1.0: 0.0, 2.0: 4.0}, 10.0)
        2.0
    """
    points = sorted(rises.items())
    if not points or points[0][1] >= limit:
        return 1.0
    for (s0, r0), (s1, r1) in itertools.pairwise(points):
        if r1 >= limit:
            return s0 + (s1 - s0) * (limit - r0) / (r1 - r0)
    return points[-1][0]


def probe_due(
    step: int,
    displacement: float,
    growth_per_step: float,
    cosine: float | None,
    last: ProbeMemo | None,
    config: GuardConfig,
) -> str | None:
    """Why a probe is due at ``step`` (a short reason for the log), or ``None``.

    Args:
        step: the current global step.
        displacement: the current displacement d (layer-normalized ‖δ‖).
        growth_per_step: recent growth of d per step (≥ 0), to predict d at the next check.
        cosine: cosine between the sketches of δ now and at the last probe (``None``: unknown).
        last: the last probe's memo (``None``: no probe yet).
        config: the guard's settings (``probe_every``, ``max_probe_interval``, ``min_cosine``,
            ``check_every``).
    """
    if not math.isfinite(displacement):
        return "the displacement is not finite"
    if config.probe_every is not None:
        return "fixed cadence" if step % config.probe_every == 0 else None
    if last is None:
        return "first probe" if displacement > 0 else None
    if step - last.step >= config.max_probe_interval:
        return f"{step - last.step} steps since the last probe"
    ahead = displacement + max(growth_per_step, 0.0) * config.check_every
    if ahead >= last.covered:
        return (
            f"the displacement {ahead:.3g} at the next check passes the {last.covered:.3g} "
            "the last probe covered"
        )
    if step >= 2 * last.step:
        return f"step {step} is twice the step of the last probe ({last.step})"
    if cosine is not None and cosine < config.min_cosine:
        return (
            f"δ turned away from the probed direction (cosine {cosine:.2f} < {config.min_cosine:g})"
        )
    return None
