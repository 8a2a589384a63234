"""Which landscape points are screened first and which generate every prompt.

With ``ProbeConfig(signal="screen")`` a point is measured by the forward screen first: the
prompts it does not flag reach a refusal phrase on their greedy path (refusals for the keyword
judge, exactly) and only the flagged ones are generated. Beyond the basin's edge the screen flags
nearly every prompt, so it only adds its own cost. The walk therefore predicts a point's flagged
fraction from the nearest point it has already measured (the surfaces are smooth on the scale of
the grid; a random line counts every random line's points at their distance from θ₀) and
generates every prompt where that fraction is at least ``ProbeConfig.generate_above``. A point that generated every prompt without the screen counts
its unsafe fraction, a lower bound of the flagged one (the screen flags every unsafe answer).

Example:
    >>> measured = [((0.0,), {"total": 10, "unsafe": 0, "flagged_prompts": [3]}),
    ...             ((0.5,), {"total": 10, "unsafe": 10})]
    >>> nearest_flag_fraction(measured, (0.4,))
    1.0
    >>> generates_every_prompt(nearest_flag_fraction(measured, (0.1,)), 0.9)
    False
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["flag_fraction", "generates_every_prompt", "nearest_flag_fraction"]


def flag_fraction(point: Mapping[str, Any]) -> float | None:
    """The fraction of a recorded point's prompts the screen flagged; where the screen did not
    run, its unsafe fraction (a lower bound: every unsafe answer is flagged). ``None`` for a
    point without prompts.

    Example:
        >>> flag_fraction({"total": 4, "unsafe": 1, "flagged_prompts": [0, 2]})
        0.5
        >>> flag_fraction({"total": 4, "unsafe": 1})
        0.25
    """
    total = point.get("total") or 0
    if total <= 0:
        return None
    flagged = point.get("flagged_prompts")
    count = len(flagged) if flagged is not None else point.get("unsafe", 0)
    return count / total


def nearest_flag_fraction(
    measured: Iterable[tuple[Sequence[float], Mapping[str, Any]]], at: Sequence[float]
) -> float | None:
    """The flagged fraction (:func:`flag_fraction`) of the measured point nearest to ``at``
    (Euclidean distance of the coordinates); of equally near points, the largest. ``None`` when
    nothing is measured yet.

    Example:
        >>> nearest_flag_fraction([((0.0, 0.0), {"total": 2, "unsafe": 0})], (0.1, 0.1))
        0.0
        >>> nearest_flag_fraction([], (0.1,)) is None
        True
    """
    best: tuple[float, float] | None = None
    for coords, point in measured:
        fraction = flag_fraction(point)
        if fraction is None:
            continue
        distance = math.dist(coords, at)
        if best is None or distance < best[0] - 1e-12:
            best = (distance, fraction)
        elif abs(distance - best[0]) <= 1e-12:
            best = (best[0], max(best[1], fraction))
    return None if best is None else best[1]


def generates_every_prompt(predicted: float | None, threshold: float) -> bool:
    """Whether a point whose flagged fraction is predicted to be ``predicted`` generates every
    prompt instead of screening first: at ``threshold`` or above (nothing measured yet: screen).

    Example:
        >>> generates_every_prompt(0.95, 0.9), generates_every_prompt(None, 0.9)
        (True, False)
    """
    return predicted is not None and predicted >= threshold
