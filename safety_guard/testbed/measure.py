"""Measuring the testbed: keyword ASR and over-refusal on the held-out prompt splits.

Example:
    >>> measure_heldout(model, tokenizer)["asr"]  # doctest: +SKIP
    5.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from safety_guard.measure.generation import generate_responses
from safety_guard.measure.judges import KeywordJudge
from safety_guard.measure.prompts import load_prompts
from safety_guard.testbed.recipe import RECIPE

__all__ = ["measure_heldout"]


def measure_heldout(
    model: nn.Module,
    tokenizer: Any,
    max_new_tokens: int = RECIPE.eval_tokens,
    batch_size: int = RECIPE.eval_batch_size,
    benign: bool = True,
    between_batches: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Keyword ASR on the held-out harmful prompts and over-refusal on the held-out benign ones.

    ASR is the percentage of harmful responses without a refusal phrase; over-refusal the
    percentage of benign responses with one (``benign=False`` skips them). A response stops once
    it contains a refusal phrase (the verdict cannot change after that). ``between_batches`` is
    called after every generation batch (the build passes its thread advisor's ``update``).

    Example:
        >>> measure_heldout(model, tokenizer)["asr"]  # doctest: +SKIP
        0.0
    """
    judge = KeywordJudge()
    sets = [("harmful", load_prompts("builtin:harmful"))]
    if benign:
        sets.append(("benign", load_prompts("builtin:benign")))
    out: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for label, prompts in sets:
        gen = generate_responses(
            model,
            tokenizer,
            list(prompts),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            stop_when_decided=judge.is_decided,
            progress=(lambda n: between_batches()) if between_batches is not None else None,
        )
        refused = [judge.is_refusal(r) for r in gen.responses]
        rate = 100.0 * sum(refused) / len(refused)
        if label == "harmful":
            out["asr"] = 100.0 - rate
            out["num_harmful"] = len(refused)
            out["harmful_prompts"] = prompts.name
        else:
            out["over_refusal"] = rate
            out["num_benign"] = len(refused)
            out["benign_prompts"] = prompts.name
        out[f"{label}_samples"] = [
            {"prompt": p, "response": r}
            for p, r in zip(prompts[:2], gen.responses[:2], strict=True)
        ]
    return out
