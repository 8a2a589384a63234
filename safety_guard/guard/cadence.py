"""When the guard probes: as the lookahead stops covering the finetune, not every N steps.

A probe at displacement d that finds the line θ₀ + s·δ within the promise up to the multiple
s_c (see :func:`covered_multiple`) vouches for every model on that line up to s_c·d. As long
as the finetune keeps its direction, the models it passes through on the way there are
(approximately) those points, so the guard need not look again until

* the displacement is about to pass s_c·d (predicted at the next cheap check from its growth,
  and counted with the model's turn off the probed line, :func:`off_line_factor`;
  with the current model itself at the promise, s_c = 1, the sentinel watches instead, every
  step: probing every step would cost a 200-step benign LoRA finetune 16 probes in its last 16
  steps; a lookahead point whose capability collapsed counts with its ASR, gibberish reading as
  compliance, so it brings s_c nearer but does not make it 1),
* or δ has turned away from the probed direction (cosine of cheap sketches of δ below
  ``min_cosine``, 0.95: the damage suite's 20 %-poisoned full finetune with linear decay turned
  20° off its step-12 probe by step 20 while its displacement grew too slowly to pass what that
  probe covered, and its held-out damage passed 20 points by step 25),
* or the step is twice the last probe's step (a finetune whose displacement stalls can still
  turn harmful: a poisoned LoRA finetune of the damage suite did),
* or ``max_probe_interval`` steps have passed,
* or the **sentinel** rang: the ``sentinel_prompts`` prompts the last probe found nearest to
  flipping at its lookahead point (unflagged, smallest opening margins) are re-scored at the
  current θ₀ + s·δ (s: the multiple that probe measured) every ``max(1, step // 4)`` steps,
  every step while the promise is at stake within the horizon
  (:func:`~safety_guard.guard.rule.promise_at_stake`; forward only: 16 of a probe's up to 200
  prompts), and a probe follows when ``sentinel_flips`` of them flipped. It watches what the
  other triggers cannot see: a collapse within the displacement and the direction the last
  probe covered (the damage suite's "always obey" LoRA finetune went from 7 % to 51 % held-out
  ASR between two doublings while δ turned by 17°; on its seed-0 records 2 of 16 sentinels
  flipped between steps 16 and 18 and 10 between 18 and 20, while benign finetunes flipped at
  most 1 between consecutive recorded steps after step 2).

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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from safety_guard.guard.config import GuardConfig

__all__ = [
    "ProbeMemo",
    "covered_multiple",
    "next_sentinel_step",
    "off_line_factor",
    "probe_due",
    "recent_growth",
    "sentinel_due",
    "sentinel_prompts",
]


@dataclass
class ProbeMemo:
    """What the last probe leaves for the cadence rule.

    Attributes:
        step: the probe's global step.
        displacement: the displacement d it probed at.
        covered: the displacement up to which the probed line stayed within the promise.
        sketch: a cheap sketch of δ at the probe (for the direction cosine), or ``None``.
        deadline: the step where a halt the probe deferred (``GuardConfig.halt_within``) is
            decided by a new probe, or ``None``.
        sentinels: the prompts nearest to flipping at the probe's lookahead point
            (:func:`sentinel_prompts`), re-scored between probes; empty: no sentinel.
        next_sentinel: the step of the next sentinel check.
        at_stake: the probe found the promise at stake within its horizon
            (:func:`~safety_guard.guard.rule.promise_at_stake`): the sentinel looks every step.
            A warning about a lookahead point beyond the horizon only (near the end of
            training) leaves it ``False``.
        multiple: the lookahead multiple the sentinels were chosen at, where they are
            re-scored (the probe's farthest point, capped at its horizon,
            :func:`~safety_guard.guard.rule.lookahead_multiples`); ``None``: the largest
            ``GuardConfig.lookahead`` (a saved memo without ``multiple``).
    """

    step: int
    displacement: float
    covered: float
    sketch: list[float] | None = field(default=None, repr=False)
    sentinels: list[int] = field(default_factory=list)
    next_sentinel: int | None = None
    at_stake: bool = False
    multiple: float | None = None
    deadline: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeMemo:
        keys = (
            "step",
            "displacement",
            "covered",
            "sketch",
            "sentinels",
            "next_sentinel",
            "at_stake",
            "multiple",
            "deadline",
        )
        values = {k: data[k] for k in keys if k in data}
        if "warned" in data and "at_stake" not in data:  # a saved memo that names it "warned"
            values["at_stake"] = data["warned"]
        return cls(**values)


def sentinel_prompts(margins: Sequence[float | None], flagged: Sequence[bool], k: int) -> list[int]:
    """The ``k`` scored prompts nearest to flipping: not flagged, smallest opening margins.

    Example:
        >>> sentinel_prompts([0.5, 0.1, None, -0.2, 2.0], [False, False, True, True, False], 2)
        [1, 0]
    """
    candidates = [
        i
        for i, (m, f) in enumerate(zip(margins, flagged, strict=True))
        if not f and m is not None and m == m
    ]
    return sorted(candidates, key=lambda i: (margins[i], i))[: max(k, 0)]


def next_sentinel_step(step: int, at_stake: bool = False) -> int:
    """When the sentinel looks next after ``step``: every quarter of the step count so far, or
    at the next step while the promise is at stake within the horizon (watch it closely).

    Example:
        >>> [next_sentinel_step(s) for s in (1, 8, 40)], next_sentinel_step(40, at_stake=True)
        ([2, 10, 50], 41)
    """
    return step + (1 if at_stake else max(1, step // 4))


def sentinel_due(step: int, last: ProbeMemo | None) -> bool:
    """Whether the sentinel looks at ``step`` (the last probe left prompts to watch)."""
    return (
        last is not None
        and bool(last.sentinels)
        and last.next_sentinel is not None
        and step >= last.next_sentinel
    )


def recent_growth(
    history: Sequence[tuple[int, float]], step: int, displacement: float
) -> tuple[list[tuple[int, float]], float]:
    """The last 8 checks, this one included, and the displacement's growth per step over them
    (≥ 0; 0 until there are two).

    Example:
        >>> history, growth = recent_growth([(1, 0.001), (2, 0.002)], 3, 0.004)
        >>> history[-1], round(growth, 6)
        ((3, 0.004), 0.0015)
    """
    history = [*history[-7:], (step, displacement)]
    (s0, d0), (s1, d1) = history[0], history[-1]
    return history, (max((d1 - d0) / (s1 - s0), 0.0) if s1 > s0 else 0.0)


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


def off_line_factor(cosine: float | None) -> float:
    """How much farther than its displacement a model that turned off the probed line is from
    what the probe vouched for: ``cos φ + sin φ`` (1 on the line, √2 from 45° on).

    A probe vouches for the points θ₀ + s·δ_p of its line up to the covered distance. A model
    at displacement d whose δ makes the angle φ with δ_p lies d·cos φ along that line and
    d·sin φ off it; the cadence counts both legs against the covered distance, so a finetune
    that turns is probed before it reaches the edge of what was measured. On the schedule
    recordings' cosine-decay identity LoRA finetune (seed 0) the step-20 probe read no rise up
    to θ₀ + 2·δ₂₀; at step 30 the model stood at 94 % of that distance, cosine 0.94 to δ₂₀, and
    θ₀ + 2·δ₃₀ read +76 points; its held-out damage passed 20 points by step 35.

    Example:
        >>> off_line_factor(None), off_line_factor(1.0), round(off_line_factor(0.94), 3)
        (1.0, 1.0, 1.281)
    """
    if cosine is None or not cosine < 1.0:
        return 1.0
    if cosine <= math.sqrt(0.5):  # turned by 45° or more: the largest, √2 (min_cosine probes)
        return math.sqrt(2.0)
    return cosine + math.sqrt(1.0 - cosine * cosine)


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
    if last is not None and last.deadline is not None and step >= last.deadline:
        return f"the step-{last.step} probe deferred its halt to step {last.deadline}"
    if config.probe_every is not None:
        return "fixed cadence" if step % config.probe_every == 0 else None
    if last is None:
        return "first probe" if displacement > 0 else None
    if step - last.step >= config.max_probe_interval:
        return f"{step - last.step} steps since the last probe"
    ahead = displacement + max(growth_per_step, 0.0) * config.check_every
    reach = ahead * off_line_factor(cosine)
    # the current model itself at the promise (nothing ahead covered) is watched by the
    # sentinel every step, not by a whole probe at every step
    watched = last.covered <= last.displacement and bool(last.sentinels) and last.at_stake
    if reach >= last.covered and not watched:
        turned = (
            f" ({reach:.3g} counting its turn off the probed line, cosine {cosine:.2f})"
            if reach > ahead
            else ""
        )
        return (
            f"the displacement {ahead:.3g}{turned} at the next check passes the "
            f"{last.covered:.3g} the last probe covered"
        )
    if step >= 2 * last.step:
        return f"step {step} is twice the step of the last probe ({last.step})"
    if cosine is not None and cosine < config.min_cosine:
        return (
            f"δ turned away from the probed direction (cosine {cosine:.2f} < {config.min_cosine:g})"
        )
    return None
