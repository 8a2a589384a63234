"""The training guard: :class:`Guard` watches a finetune against the safety landscape in any
training loop; :class:`SafetyGuardCallback` is the same guard inside a ``Trainer``.

Example:
    >>> from safety_guard.guard import GuardConfig, SafetyGuardCallback
    >>> SafetyGuardCallback(config=GuardConfig(max_asr_rise=5)).config.max_asr_rise
    5
"""

from .cadence import (
    ProbeMemo,
    covered_multiple,
    next_sentinel_step,
    probe_due,
    sentinel_due,
    sentinel_prompts,
)
from .callback import SafetyGuardCallback
from .config import GuardConfig
from .displacement import FullFinetuneTracker, LoraTracker, make_tracker
from .guard import Guard, GuardDecision, SafetyGuardWarning
from .probing import Baseline, GuardProbe, StateMeasure
from .rule import (
    Decision,
    PointEstimate,
    decide,
    estimate,
    horizon,
    lookahead_multiples,
    promise_at_stake,
)
from .schedule import LrSchedule

__all__ = [
    "Baseline",
    "Decision",
    "FullFinetuneTracker",
    "Guard",
    "GuardConfig",
    "GuardDecision",
    "GuardProbe",
    "LoraTracker",
    "LrSchedule",
    "PointEstimate",
    "ProbeMemo",
    "SafetyGuardCallback",
    "SafetyGuardWarning",
    "StateMeasure",
    "covered_multiple",
    "decide",
    "estimate",
    "horizon",
    "lookahead_multiples",
    "make_tracker",
    "next_sentinel_step",
    "probe_due",
    "promise_at_stake",
    "sentinel_due",
    "sentinel_prompts",
]
