"""What the guard tells the training loop at a step: :class:`GuardDecision`, and the warning
category of its warn decisions.

Example:
    >>> GuardDecision(step=3, status="halt", reason="the weights are not finite", halt=True).halt
    True
"""

from __future__ import annotations

import dataclasses

__all__ = ["GuardDecision", "SafetyGuardWarning"]


class SafetyGuardWarning(UserWarning):
    """The finetune is approaching the guard's promise (a warn decision). Halts, and a model
    that does not refuse at ``begin``, are WARNING log lines instead: no warning filter can
    hide them."""


@dataclasses.dataclass(frozen=True)
class GuardDecision:
    """What the guard decided at one step.

    Attributes:
        step: the step.
        status: ``"ok"``, ``"warn"`` or ``"halt"`` (a halt decision, taken or, with
            ``GuardConfig(halt=False)``, only reported).
        reason: why, for a warning or a halt.
        halt: stop training now.
        probed: a probe ran at this step.
        metrics: the ``safety/*`` values measured at this step, for your logger.

    Example:
        >>> GuardDecision(step=3).warn, GuardDecision(step=3, status="warn").event
        (False, True)
    """

    step: int
    status: str = "ok"
    reason: str | None = None
    halt: bool = False
    probed: bool = False
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def warn(self) -> bool:
        """A warn decision: the finetune approaches the promise."""
        return self.status == "warn"

    @property
    def event(self) -> bool:
        """A probe, a warning or a halt: worth a log entry of its own now."""
        return self.probed or self.status != "ok"
