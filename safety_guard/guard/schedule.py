"""The run's learning-rate schedule, as the guard reads it: how much learning rate is spent and
how much is left.

An optimizer moves the weights roughly in proportion to its learning rate (Adam's steps are
about ``lr`` long per coordinate), so where the remaining steps can take the model depends on
the learning rate they have left, not on their count: at step 114 of a 200-step run with linear
decay, the remaining steps hold about a fifth of the learning rate the first 114 spent. The
guard's horizon (:func:`~safety_guard.guard.rule.horizon`) counts progress in these units; with
a constant learning rate they are steps.

Example:
    >>> linear = LrSchedule([1 - k / 200 for k in range(200)])
    >>> round(linear.spent(114), 1), round(linear.left(114), 1)
    (81.8, 18.7)
    >>> LrSchedule.constant(10).left(4)
    6.0
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LrSchedule"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LrSchedule:
    """The learning-rate multiplier of every optimizer step of the run.

    ``multipliers[k]`` is the multiplier (of the peak learning rate) that step ``k + 1`` uses,
    i.e. the scheduler's value after ``k`` scheduler steps; its length is the run's
    ``max_steps``.
    """

    multipliers: tuple[float, ...]

    def __init__(self, multipliers: Sequence[float]) -> None:
        values = tuple(float(m) for m in multipliers)
        if not values or any(not math.isfinite(m) or m < 0 for m in values):
            raise ValueError(
                "LrSchedule needs one finite, non-negative learning-rate multiplier per step; "
                f"got {len(values)} values"
                + (
                    f", e.g. {next(m for m in values if not math.isfinite(m) or m < 0)}"
                    if values
                    else ""
                )
                + "."
            )
        object.__setattr__(self, "multipliers", values)
        object.__setattr__(self, "_cumulative", (0.0, *itertools.accumulate(values)))

    @classmethod
    def constant(cls, max_steps: int) -> LrSchedule:
        """A constant learning rate over ``max_steps`` steps."""
        return cls([1.0] * max_steps)

    @classmethod
    def from_scheduler(cls, scheduler: Any, max_steps: int) -> LrSchedule | None:
        """Read a ``LambdaLR`` (what ``transformers.get_scheduler`` builds for every named
        schedule: constant, linear, cosine, polynomial, with or without warmup) over
        ``max_steps`` steps; None for a scheduler whose future values cannot be read without
        stepping it (the guard then counts steps).

        Example:
            >>> import torch
            >>> from transformers import get_scheduler
            >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            >>> cosine = get_scheduler("cosine", opt, num_warmup_steps=10, num_training_steps=100)
            >>> s = LrSchedule.from_scheduler(cosine, 100)
            >>> s.multipliers[0], s.multipliers[10], round(s.multipliers[55], 3)
            (0.0, 1.0, 0.5)
        """
        from torch.optim.lr_scheduler import LambdaLR

        # (MultiplicativeLR also has lr_lambdas, but they are factors of the previous step's)
        if not isinstance(scheduler, LambdaLR) or max_steps is None or max_steps < 1:
            return None
        first = scheduler.lr_lambdas[0]
        try:
            return cls([first(k) for k in range(max_steps)])
        except (TypeError, ValueError, ArithmeticError) as err:
            logger.info("SafetyGuard: cannot read the learning-rate schedule (%s).", err)
            return None

    @classmethod
    def of(cls, schedule: Any, max_steps: int | None) -> LrSchedule | None:
        """An :class:`LrSchedule` as it is, a scheduler read by :meth:`from_scheduler`, or None
        (said in the log when a scheduler cannot be read ahead: the guard counts steps).

        Example:
            >>> LrSchedule.of(LrSchedule.constant(3), 3).multipliers, LrSchedule.of(None, 3)
            ((1.0, 1.0, 1.0), None)
        """
        if schedule is None or isinstance(schedule, LrSchedule):
            return schedule
        read = cls.from_scheduler(schedule, max_steps)
        if read is None:
            logger.info(
                "SafetyGuard: the learning-rate schedule cannot be read ahead (not a LambdaLR); "
                "the horizon counts the remaining steps as if the learning rate stayed constant."
            )
        return read

    def __len__(self) -> int:
        return len(self.multipliers)

    def spent(self, step: int) -> float:
        """Learning rate used by the first ``step`` steps (in units of the peak's step)."""
        return self._cumulative[min(max(step, 0), len(self))]

    def left(self, step: int, steps: int | None = None) -> float:
        """Learning rate the steps after ``step`` have left: the next ``steps`` of them, or all
        to the end of the run."""
        end = self._cumulative[-1] if steps is None else self.spent(step + steps)
        return end - self.spent(step)

    def steps_to_spend(self, step: int, amount: float) -> int | None:
        """How many steps after ``step`` it takes to spend ``amount`` of learning rate; None when
        the run ends first.

        Example:
            >>> LrSchedule([1.0, 1.0, 0.5, 0.5]).steps_to_spend(1, 1.5)
            2
            >>> LrSchedule.constant(10).steps_to_spend(8, 3.0) is None
            True
        """
        if amount <= 0.0:
            return 0
        target = self.spent(step) + amount
        k = bisect.bisect_left(self._cumulative, target - 1e-12)
        return k - step if k <= len(self) else None

    def at(self, step: int) -> float:
        """The multiplier of the last step taken (``step`` ≥ 1), 0 before any."""
        return self.multipliers[min(step, len(self)) - 1] if step >= 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"multipliers": [round(m, 9) for m in self.multipliers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LrSchedule:
        return cls(data["multipliers"])
