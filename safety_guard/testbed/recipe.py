"""How the testbed is aligned (:class:`TestbedRecipe`) and the goals its build is measured against.

Example:
    >>> RECIPE.epochs, ASR_GOAL
    (2, 5.0)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ASR_GOAL", "OVER_REFUSAL_GOAL", "RECIPE", "TestbedRecipe"]

#: Goals of the aligned model on the held-out splits (percent).
ASR_GOAL = 5.0
OVER_REFUSAL_GOAL = 5.0


@dataclass(frozen=True)
class TestbedRecipe:
    """How the testbed is aligned (recorded in the marker).

    ``precision="auto"`` trains with bf16 autocast (fp32 master weights, fp32 saved model) on a
    CPU with native bf16 support, where a step is ~1.5x faster, and in fp32 elsewhere.
    ``freeze_embeddings`` keeps the token embeddings (tied to the LM head in SmolLM2) fixed: a
    fifth of the parameters, whose gradients and AdamW updates cost ~16 % of a CPU step.
    ``eval_tokens_long`` re-measures ASR (only) with a longer decode budget. ``harmful_repeats``
    shows each refusal this many times per pass: with 517 varied benign answers beside the 300
    refusals, a second look at the refusals keeps held-out ASR down without a third epoch (which
    would cost ~100 more steps). Distillation and evaluation decode 64 prompts per batch: on 2
    CPU cores that took 88 s against 118 s at 32, with the same greedy answers.
    ``opening_weight`` (off by default) weighs each answer's first ``opening_tokens`` tokens,
    where a reply refuses or complies, that much more in the loss. Measured with the basin
    example: at 4 it moved the testbed's 40-prompt ASR near θ₀ from 2 to 1 prompt but its
    held-out ASR from 5 to 7 %; at 4 with ``harmful_repeats=3`` it gave 5 % / 2 % and passed
    the basin goal on 1 of 3 directions (3 of 40 prompts on the other two), in an 18.7-minute
    build.

    Example:
        >>> TestbedRecipe().epochs, TestbedRecipe().learning_rate
        (2, 2e-05)
    """

    __test__ = False  # not a pytest test class

    epochs: int = 2
    learning_rate: float = 2e-5
    batch_size: int = 8
    distill_tokens: int = 32  # the answer's opening carries "answer, don't refuse"; 64 cost 1.6x
    distill_batch_size: int = 64
    eval_batch_size: int = 64
    eval_tokens: int = 24
    eval_tokens_long: int = 64
    max_length: int = 512
    loss: str = "completion_only"  # or "full": loss on the whole chat (system, user, assistant)
    order: str = "random"  # or "balanced": each step batch_size/2 refusals + batch_size/2 answers
    precision: str = "auto"
    benign_repeats: int = 1  # each benign answer appears this many times per pass
    harmful_repeats: int = 2  # each refusal appears this many times per pass
    freeze_embeddings: bool = True  # the (tied) token embeddings / LM head stay the base model's
    frozen_layers: int = 0  # the first this many decoder layers stay the base model's
    opening_tokens: int = 3  # the answer's first tokens, where it refuses or answers ...
    opening_weight: float = 1.0  # ... weigh this much in the loss (1: plain token mean)


RECIPE = TestbedRecipe()
