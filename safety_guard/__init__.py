"""safety-guard: the safety landscape of chat LLMs, and a Trainer callback that guards finetunes.

Example:
    >>> import safety_guard
    >>> safety_guard.visage([-0.1, 0.0, 0.1], [100.0, 0.0, 100.0])
    33.333333333333336
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._extras import MissingExtraError
from .basin import BasinEdges, basin_edges, visage
from .directions import InterpolationDirection, LoraDirection, RandomDirection
from .generation import ChatFormat, MissingChatTemplateError, generate_responses
from .guard import Guard, GuardConfig, GuardDecision, SafetyGuardCallback
from .judges import CallableJudge, KeywordJudge, PipelineJudge
from .landscape import (
    Landscape,
    LandscapeConfig,
    LandscapeFileError,
    LandscapeMismatchError,
    compute_landscape,
)
from .perturb import WeightPerturbation
from .probe import PAPER_PROBE, PointResult, ProbeConfig, SafetyProbe
from .prompts import PromptSet, load_prompts
from .weights import ParameterSelection, model_fingerprint

__all__ = [
    "PAPER_PROBE",
    "BasinEdges",
    "CallableJudge",
    "ChatFormat",
    "Guard",
    "GuardConfig",
    "GuardDecision",
    "InterpolationDirection",
    "KeywordJudge",
    "Landscape",
    "LandscapeConfig",
    "LandscapeFileError",
    "LandscapeMismatchError",
    "LoraDirection",
    "MissingChatTemplateError",
    "MissingExtraError",
    "ParameterSelection",
    "PipelineJudge",
    "PointResult",
    "ProbeConfig",
    "PromptSet",
    "RandomDirection",
    "SafetyGuardCallback",
    "SafetyProbe",
    "WeightPerturbation",
    "__version__",
    "basin_edges",
    "compute_landscape",
    "generate_responses",
    "load_prompts",
    "model_fingerprint",
    "visage",
]
