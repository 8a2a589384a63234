"""The guard's baseline of the aligned model, recorded with its landscape.

A landscape file computed for guarding carries the guard's own measurement of the aligned model
(``"guard_baseline"``), so every guarded finetune of this model with the same guard settings
starts without a generation pass over the probe prompts.

Example:
    >>> land = compute_landscape(model, tokenizer, output="landscape.json")  # doctest: +SKIP
    >>> record_guard_baseline(land, model, tokenizer, output="landscape.json")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from safety_guard.engines.collectives import rank_and_world
from safety_guard.guard.config import GuardConfig
from safety_guard.guard.probing import GuardProbe
from safety_guard.landscape.file import Landscape

__all__ = ["record_guard_baseline"]


def record_guard_baseline(
    land: Landscape,
    model: nn.Module,
    tokenizer: Any,
    system_prompt: str | None = None,
    output: str | os.PathLike[str] | None = None,
    judge: Any = None,
) -> None:
    """Measure the aligned model as the guard does at ``begin``, into the landscape (and its file).

    The guard's baseline (each default probe prompt's refusal opening and judged answer, the
    capability references; :class:`~safety_guard.guard.probing.Baseline`) costs a generation
    pass over its 200 prompts. Recorded once with the landscape, it is reused by every guarded
    finetune of this model whose guard settings (prompts, chat template, judge, dtype, decode
    budget) are the same; otherwise the guard measures its own. Call with the model at θ₀.
    Nothing is recorded for a tokenizer without a chat template (the guard needs one).

    Example:
        >>> record_guard_baseline(land, model, tokenizer, output="landscape.json")  # doctest: +SKIP
    """
    if getattr(tokenizer, "chat_template", None) is None:  # the guard probes chat models only
        return
    probe = GuardProbe(model, tokenizer, GuardConfig(system_prompt=system_prompt), judge)
    if probe.probe.lockstep:  # sharded: the guard measures its own, in lockstep
        return
    probe.prepare(model, probe.num_prompts, screen=False)  # (each run screens in its numerics)
    probe.prepare_capability(model)
    land.data["guard_baseline"] = probe.baseline.to_dict()
    if output is not None and rank_and_world()[0] == 0:
        land.save(output)
