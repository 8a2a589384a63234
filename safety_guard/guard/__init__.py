"""The training guard: :class:`Guard` watches a finetune against the safety landscape in any
training loop; :class:`SafetyGuardCallback` is the same guard inside a ``Trainer``.

Example:
    >>> from safety_guard.guard import GuardConfig, SafetyGuardCallback
    >>> SafetyGuardCallback(config=GuardConfig(max_asr_rise=5)).config.max_asr_rise
    5
"""

from safety_guard.guard.baseline import record_guard_baseline
from safety_guard.guard.cadence import (
    ProbeMemo,
    covered_multiple,
    next_sentinel_step,
    probe_due,
    sentinel_due,
    sentinel_prompts,
)
from safety_guard.guard.callback import SafetyGuardCallback
from safety_guard.guard.config import GuardConfig
from safety_guard.guard.displacement import FullFinetuneTracker, LoraTracker, make_tracker
from safety_guard.guard.forecast import crossing_multiple, eta_steps
from safety_guard.guard.guard import Guard, GuardDecision, SafetyGuardWarning
from safety_guard.guard.probing import Baseline, GuardProbe, StateMeasure
from safety_guard.guard.rule import (
    Decision,
    PointEstimate,
    decide,
    estimate,
    horizon,
    lookahead_multiples,
    pace,
    promise_at_stake,
)
from safety_guard.guard.schedule import LrSchedule

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
    "crossing_multiple",
    "decide",
    "estimate",
    "eta_steps",
    "horizon",
    "lookahead_multiples",
    "make_tracker",
    "next_sentinel_step",
    "pace",
    "probe_due",
    "promise_at_stake",
    "record_guard_baseline",
    "sentinel_due",
    "sentinel_prompts",
]
