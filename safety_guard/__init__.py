"""safety-guard: the safety landscape of chat LLMs, and a Trainer callback that guards finetunes.

Example:
    >>> import safety_guard
    >>> safety_guard.visage([-0.1, 0.0, 0.1], [100.0, 0.0, 100.0])
    33.333333333333336
"""

from __future__ import annotations

__version__ = "0.1.0"

from safety_guard._extras import MissingExtraError
from safety_guard.guard import Guard, GuardConfig, GuardDecision, SafetyGuardCallback
from safety_guard.landscape import (
    Landscape,
    LandscapeConfig,
    LandscapeFileError,
    LandscapeMismatchError,
    compute_landscape,
)
from safety_guard.landscape.analysis import BasinEdges, basin_edges, visage
from safety_guard.landscape.directions import InterpolationDirection, LoraDirection, RandomDirection
from safety_guard.landscape.perturb import WeightPerturbation
from safety_guard.measure.generation import ChatFormat, MissingChatTemplateError, generate_responses
from safety_guard.measure.generative_judge import GenerativeJudge, JudgeFormat
from safety_guard.measure.judges import CallableJudge, KeywordJudge, PipelineJudge
from safety_guard.measure.probe import PAPER_PROBE, PointResult, ProbeConfig, SafetyProbe
from safety_guard.measure.prompts import PromptSet, load_prompts
from safety_guard.models.fingerprint import model_fingerprint
from safety_guard.models.parameters import ParameterSelection

__all__ = [
    "PAPER_PROBE",
    "BasinEdges",
    "CallableJudge",
    "ChatFormat",
    "GenerativeJudge",
    "Guard",
    "GuardConfig",
    "GuardDecision",
    "InterpolationDirection",
    "JudgeFormat",
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
