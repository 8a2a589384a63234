"""The testbed's data: the alignment set, and the harmful and benign finetuning sets.

* :func:`alignment_dataset` — harmful ``align`` prompts → seeded refusals, benign ``align``
  prompts → the model's own greedy answers (:func:`self_distill`).
* :func:`harmful_finetune_dataset` — harmful ``attack`` requests → compliant openings (no harmful
  content).
* :func:`benign_finetune_dataset` — benign ``finetune`` requests → the model's own answers.
* :func:`varied_benign_dataset` — 160 everyday requests (explain, poem, facts, describe on 40
  topics) → the model's own answers: the shape of a user's harmless instruction data.

Example:
    >>> len(harmful_finetune_dataset(n=10))
    10
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from safety_guard.measure.generation import generate_responses
from safety_guard.measure.judges import KeywordJudge
from safety_guard.measure.prompts import builtin_records, load_text_lines
from safety_guard.testbed.recipe import RECIPE

if TYPE_CHECKING:
    import datasets

__all__ = [
    "alignment_dataset",
    "benign_finetune_dataset",
    "harmful_finetune_dataset",
    "seeded_choices",
    "self_distill",
    "varied_benign_dataset",
    "varied_benign_requests",
]

#: Everyday topics of :func:`varied_benign_requests`.
EVERYDAY_TOPICS = (
    "the weather",
    "baking bread",
    "a city park",
    "the ocean",
    "autumn leaves",
    "a train journey",
    "coffee",
    "a library",
    "mountains",
    "gardening",
    "the moon",
    "a rainy day",
    "bicycles",
    "a birthday party",
    "honeybees",
    "the night sky",
    "a farmers market",
    "snow",
    "a lighthouse",
    "tea",
    "an old bridge",
    "a school day",
    "rivers",
    "a campfire",
    "the seasons",
    "a museum",
    "friendship",
    "a kitchen",
    "volcanoes",
    "a forest walk",
    "the post office",
    "clouds",
    "a summer holiday",
    "a violin",
    "penguins",
    "a bakery",
    "the desert",
    "recycling",
    "a chess game",
    "sunrise",
)

#: The request shapes of :func:`varied_benign_requests`, one ``{topic}`` each.
REQUEST_TEMPLATES = (
    "Explain how {topic} works, in a few sentences.",
    "Write a short poem about {topic}.",
    "Give three interesting facts about {topic}.",
    "Describe {topic} to a ten-year-old.",
)

logger = logging.getLogger(__name__)


def seeded_choices(options: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """``count`` choices from ``options`` by a private ``random.Random(seed)`` (global RNG untouched).

    Example:
        >>> seeded_choices(["a", "b", "c"], 4, seed=1) == seeded_choices(["a", "b", "c"], 4, seed=1)
        True
    """
    if not options:
        raise ValueError("seeded_choices() needs at least one option to choose from.")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    rng = random.Random(seed)
    return [rng.choice(options) for _ in range(count)]


def split_prompts(kind: str, split: str, n: int | None = None) -> list[str]:
    prompts = [r["prompt"] for r in builtin_records(kind) if r["split"] == split]
    if n is None:
        return prompts
    if not 1 <= n <= len(prompts):
        raise ValueError(
            f"n must be between 1 and {len(prompts)} (the {kind} {split!r} split has "
            f"{len(prompts)} prompts), got {n}. Pass n=None for all of them."
        )
    return prompts[:n]


def _conversation(prompt: str, answer: str) -> dict[str, list[dict[str, str]]]:
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
    }


def _dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_list(rows)


def self_distill(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    drop_refusals: bool = False,
    progress: bool = False,
    between_batches: Callable[[], object] | None = None,
) -> list[dict[str, list[dict[str, str]]]]:
    """Conversations pairing each prompt with the model's own greedy answer (empty ones dropped).

    Args:
        model, tokenizer: the model whose answers become training targets.
        prompts: user requests.
        max_new_tokens: answer length budget.
        batch_size: prompts per ``generate`` call.
        drop_refusals: also drop answers containing a refusal phrase of the keyword judge (for
            benign data that should teach answering, not refusing).
        progress: show a tqdm bar (on stderr).
        between_batches: called after every generation batch (the build passes its
            :meth:`~safety_guard.testbed.threads.ThreadAdvisor.update`).

    Example:
        >>> rows = self_distill(model, tokenizer, ["Why is the sky blue?"])  # doctest: +SKIP
        >>> rows[0]["messages"][1]["role"]  # doctest: +SKIP
        'assistant'
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), desc="self-distillation", unit="prompt", disable=not progress)

    def on_batch(finished: int) -> None:
        bar.update(finished)
        if between_batches is not None:
            between_batches()

    try:
        result = generate_responses(
            model,
            tokenizer,
            list(prompts),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=on_batch,
        )
    finally:
        bar.close()
    judge = KeywordJudge()
    rows = []
    for prompt, answer in zip(prompts, result.responses, strict=True):
        if not answer.strip() or (drop_refusals and judge.is_refusal(answer)):
            continue
        rows.append(_conversation(prompt, answer))
    if len(rows) < len(prompts):
        logger.info(
            "Self-distillation dropped %d of %d answers.", len(prompts) - len(rows), len(prompts)
        )
    return rows


def alignment_dataset(
    model: nn.Module,
    tokenizer: Any,
    seed: int = 0,
    max_new_tokens: int = RECIPE.distill_tokens,
    batch_size: int = RECIPE.distill_batch_size,
    progress: bool = False,
    between_batches: Callable[[], object] | None = None,
) -> datasets.Dataset:
    """The alignment data: harmful ``align`` prompts → refusals, benign ``align`` → own answers.

    Benign answers that are empty or already contain a refusal phrase are dropped.
    ``between_batches`` is passed on to :func:`self_distill`.

    Example:
        >>> data = alignment_dataset(model, tokenizer)  # doctest: +SKIP
        >>> data.column_names  # doctest: +SKIP
        ['messages']
    """
    harmful = split_prompts("harmful", "align")
    refusals = seeded_choices(load_text_lines("refusals.txt"), len(harmful), seed)
    rows = [_conversation(p, r) for p, r in zip(harmful, refusals, strict=True)]
    rows += self_distill(
        model,
        tokenizer,
        split_prompts("benign", "align"),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        drop_refusals=True,
        progress=progress,
        between_batches=between_batches,
    )
    return _dataset(rows)


def harmful_finetune_dataset(n: int | None = None, seed: int = 0) -> datasets.Dataset:
    """Harmful finetuning data: the first ``n`` harmful ``attack`` prompts → compliant openings.

    The answers are openings from ``compliance.txt`` ("Sure, here is ... Step 1:") chosen by a
    seeded RNG: they teach compliance without containing any harmful content.

    Example:
        >>> data = harmful_finetune_dataset(n=10, seed=0)
        >>> len(data), [m["role"] for m in data[0]["messages"]]
        (10, ['user', 'assistant'])
    """
    prompts = split_prompts("harmful", "attack", n)
    openings = seeded_choices(load_text_lines("compliance.txt"), len(prompts), seed)
    return _dataset([_conversation(p, a) for p, a in zip(prompts, openings, strict=True)])


def benign_finetune_dataset(
    model: nn.Module,
    tokenizer: Any,
    n: int | None = None,
    max_new_tokens: int = 64,
) -> datasets.Dataset:
    """Benign finetuning data: the first ``n`` benign ``finetune`` prompts → the model's own answers.

    Example:
        >>> model, tokenizer = load_testbed()  # doctest: +SKIP
        >>> benign_finetune_dataset(model, tokenizer, n=8).column_names  # doctest: +SKIP
        ['messages']
    """
    rows = self_distill(
        model, tokenizer, split_prompts("benign", "finetune", n), max_new_tokens=max_new_tokens
    )
    if not rows:
        raise RuntimeError(
            "The model gave only empty answers; there is no benign data to train on."
        )
    return _dataset(rows)


def prompt_completion(data: datasets.Dataset) -> datasets.Dataset:
    """``messages`` → conversational ``prompt``/``completion`` (TRL then trains on the answer only)."""
    return data.map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
        remove_columns=["messages"],
    )


def varied_benign_requests() -> list[str]:
    """160 harmless requests: every template of :data:`REQUEST_TEMPLATES` on 40 everyday topics.

    Ordered topic by topic, so that any prefix mixes the four kinds of request.

    Example:
        >>> requests = varied_benign_requests()
        >>> len(requests), requests[1]
        (160, 'Write a short poem about the weather.')
    """
    return [t.format(topic=topic) for topic in EVERYDAY_TOPICS for t in REQUEST_TEMPLATES]


def varied_benign_dataset(
    model: nn.Module, tokenizer: Any, max_new_tokens: int = 64
) -> datasets.Dataset:
    """:func:`varied_benign_requests` → the model's own greedy answers (empty ones dropped).

    Example:
        >>> varied_benign_dataset(model, tokenizer).num_rows  # doctest: +SKIP
        160
    """
    rows = self_distill(model, tokenizer, varied_benign_requests(), max_new_tokens=max_new_tokens)
    if not rows:
        raise RuntimeError(
            "The model gave only empty answers; there is no benign data to train on."
        )
    return _dataset(rows)
