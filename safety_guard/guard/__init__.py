"""The training guard: a ``TrainerCallback`` that watches a finetune against the safety landscape.

Example:
    >>> from safety_guard.guard import GuardConfig, SafetyGuardCallback
    >>> SafetyGuardCallback(config=GuardConfig(probe_every=5)).config.probe_every
    5
"""

from .callback import SafetyGuardCallback, SafetyGuardWarning
from .config import GuardConfig
from .displacement import FullFinetuneTracker, LoraTracker, make_tracker
from .rule import Decision, decide

__all__ = [
    "Decision",
    "FullFinetuneTracker",
    "GuardConfig",
    "LoraTracker",
    "SafetyGuardCallback",
    "SafetyGuardWarning",
    "decide",
    "make_tracker",
]
