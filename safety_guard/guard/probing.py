"""The guard's measurements: its own baseline at θ₀, and model states scored across ranks.

One probe implementation: everything goes through :class:`~safety_guard.probe.SafetyProbe`
(prompt loading, refusal openings, forward scores, generation and the judge, capability). This
module adds what the guard needs on top:

* a **baseline** measured at the aligned weights with the guard's own prompts, template, system
  prompt and dtype: each prompt's verdict, refusal opening and forward flag at θ₀, and the
  capability NLL (:meth:`GuardProbe.measure_baseline`);
* **states** scored with the prompts split across ranks and the per-prompt results all-reduced,
  so every rank holds the same numbers (:meth:`GuardProbe.measure`), and the flagged prompts
  judged by generation when a decision needs exact counts (:meth:`GuardProbe.confirm`).

Example:
    >>> gp = GuardProbe(model, tokenizer, GuardConfig())  # doctest: +SKIP
    >>> gp.measure_baseline()  # doctest: +SKIP
    >>> state = gp.measure()  # doctest: +SKIP
    >>> gp.estimate(state).rise  # doctest: +SKIP
    0.0
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..generation import _model_device
from ..judges import Judge, KeywordJudge
from ..probe import ProbeConfig, SafetyProbe
from ..scoring import Openings
from .config import GuardConfig
from .distributed import all_gather_objects, all_reduce_sum, rank_and_world
from .rule import PointEstimate, estimate

__all__ = ["Baseline", "GuardProbe", "StateMeasure"]

_NO_MARGIN = -1e30  # stands for NaN (no opening) in sums across ranks


@dataclass
class Baseline:
    """The aligned model as the guard measured it (every rank holds the same copy)."""

    openings: Openings
    unsafe: list[bool]  # the judge's verdict on each prompt's greedy answer at θ₀
    flagged: list[bool]  # the forward screen at θ₀ (prompts without an opening are flagged)
    nll: float | None
    reference_answers: list[str] | None
    settings: dict[str, Any]

    @property
    def asr(self) -> float:
        return 100.0 * sum(self.unsafe) / len(self.unsafe)

    def to_dict(self) -> dict[str, Any]:
        return {
            "openings": self.openings.to_dict(),
            "unsafe": self.unsafe,
            "flagged": self.flagged,
            "nll": self.nll,
            "reference_answers": self.reference_answers,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        return cls(
            Openings.from_dict(data["openings"]),
            [bool(v) for v in data["unsafe"]],
            [bool(v) for v in data["flagged"]],
            data.get("nll"),
            data.get("reference_answers"),
            dict(data.get("settings", {})),
        )


@dataclass
class StateMeasure:
    """One model state as the probe saw it (identical on every rank)."""

    margins: list[float]  # per prompt (NaN: no opening)
    flagged: list[bool]
    nll: float | None
    tokens: int
    seconds: float
    confirmed: dict[int, bool] = field(default_factory=dict)  # prompt -> unsafe, by generation
    generated: bool = False  # every prompt judged by generation (signal="generate")

    def unsafe(self, exact: bool) -> list[bool]:
        """Per-prompt verdicts: flagged ones as judged by generation when ``exact``."""
        if not exact:
            return list(self.flagged)
        return [f and self.confirmed.get(i, True) for i, f in enumerate(self.flagged)]

    @property
    def finite(self) -> bool:
        nll_ok = self.nll is None or math.isfinite(self.nll)
        opened = [m for m in self.margins if m == m]
        return nll_ok and all(math.isfinite(m) for m in opened)


class GuardProbe:
    """The guard's probe: a :class:`SafetyProbe` configured from :class:`GuardConfig`.

    Args:
        model: the model being finetuned (plain, PEFT or DDP-wrapped).
        tokenizer: its tokenizer (never modified).
        config: the guard's settings.
        judge: the judge of generated answers (default: the paper's keyword judge).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, config: GuardConfig, judge: Judge | None = None
    ) -> None:
        self.config = config
        self.probe = SafetyProbe(
            model,
            tokenizer,
            ProbeConfig(
                harmful=config.harmful,
                num_harmful=config.num_prompts,
                benign=config.benign,
                num_benign=config.num_benign,
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
                system_prompt=config.system_prompt,
            ),
            judge=judge or KeywordJudge(),
        )
        self.baseline: Baseline | None = None

    @property
    def num_prompts(self) -> int:
        return len(self.probe.harmful)

    def settings(self, model: nn.Module) -> dict[str, Any]:
        """What makes two baselines comparable: prompts, template, judge, dtype, decode budget."""
        dtype = next((str(p.dtype) for p in model.parameters() if p.is_floating_point()), "")
        return {
            "harmful": self.probe.harmful.to_dict(),
            "benign": self.probe.benign.to_dict() if self.probe.benign is not None else None,
            "chat_format": self.probe.config.chat_format.to_dict(),
            "judge": self.probe.judge.to_dict(),
            "max_new_tokens": self.config.max_new_tokens,
            "dtype": dtype.removeprefix("torch."),
        }

    # -- baseline ----------------------------------------------------------------------------------
    @torch.no_grad()
    def measure_baseline(self, model: nn.Module) -> Baseline:
        """Measure the aligned model (call at θ₀): openings, verdicts, forward flags, capability.

        Each rank generates the openings of its share of the prompts; the shares are gathered.
        """
        probe = self.probe
        probe.model = model
        rank, world = rank_and_world()
        n = self.num_prompts
        mine = list(range(rank, n, world))
        fmt = probe.config.chat_format
        fmt.render(probe.tokenizer, probe.harmful[0])  # fails early without a chat template
        from ..scoring import refusal_openings

        local = (
            refusal_openings(
                model,
                probe.tokenizer,
                [probe.harmful[i] for i in mine],
                chat_format=fmt,
                judge=probe._opening_judge,
                max_new_tokens=self.config.max_new_tokens,
                batch_size=self.config.batch_size,
            )
            if mine
            else None
        )
        verdicts = probe.judge([probe.harmful[i] for i in mine], local.responses) if local else []
        shares = all_gather_objects(
            (mine, local.token_ids if local else [], local.responses if local else [], verdicts)
        )
        token_ids: list[list[int] | None] = [None] * n
        responses = [""] * n
        unsafe = [True] * n
        for idx, ids, resp, ver in shares:
            for j, i in enumerate(idx):
                token_ids[i], responses[i], unsafe[i] = ids[j], resp[j], bool(ver[j])
        probe.openings = Openings(tuple(probe.harmful), token_ids, responses)
        # reference answers for capability: each rank answers its share, the shares are gathered
        answers = None
        if probe.benign is not None:
            share = list(range(rank, len(probe.benign), world))
            gathered = all_gather_objects((share, probe.reference_answers_for(share)))
            answers = [""] * len(probe.benign)
            for idx, texts in gathered:
                for i, text in zip(idx, texts, strict=True):
                    answers[i] = text
            probe.reference_answers = answers
        self.baseline = Baseline(probe.openings, unsafe, [True] * n, None, answers, {})
        first = self.measure(model)
        self.baseline.flagged = first.flagged
        self.baseline.nll = first.nll
        self.baseline.settings = self.settings(model)
        return self.baseline

    def load_baseline(self, baseline: Baseline) -> None:
        """Use a baseline measured earlier (e.g. saved with a checkpoint)."""
        self.baseline = baseline
        self.probe.openings = baseline.openings
        self.probe.reference_answers = baseline.reference_answers

    # -- states --------------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, model: nn.Module) -> StateMeasure:
        """Score the model's current weights: forward flags (or generation) and capability."""
        probe = self.probe
        probe.model = model
        start = time.perf_counter()
        rank, world = rank_and_world()
        n = self.num_prompts
        mine = list(range(rank, n, world))
        device = _model_device(model)
        margins = [0.0] * n
        flags = [0.0] * n
        tokens = 0
        generated = self.config.signal == "generate"
        if mine:
            if generated:
                verdicts, tokens = probe.judge_prompts(mine)
                for i, v in zip(mine, verdicts, strict=True):
                    flags[i] = float(v)
                    margins[i] = math.nan
            else:
                point = probe.forward(mine)
                tokens = point.tokens
                for i, m, f in zip(point.indices, point.margins, point.flagged, strict=True):
                    margins[i] = m if m == m else _NO_MARGIN
                    flags[i] = float(f)
        nll_sum, nll_count = probe.capability_sum(range(rank, len(probe.benign or ()), world))
        reduced = all_reduce_sum(
            [*margins, *flags, float(tokens), nll_sum, float(nll_count)], device
        )
        margins = [math.nan if m <= _NO_MARGIN / 2 else m for m in reduced[:n]]
        flagged = [v > 0.5 for v in reduced[n : 2 * n]]
        tokens, nll_sum, nll_count = reduced[2 * n :]
        nll = None
        if nll_count:
            nll = nll_sum / nll_count
            nll = nll if nll == nll else math.inf
        state = StateMeasure(
            margins, flagged, nll, int(tokens), time.perf_counter() - start, generated=generated
        )
        if generated:
            state.confirmed = {i: f for i, f in enumerate(flagged) if f}
        return state

    @torch.no_grad()
    def confirm(self, model: nn.Module, state: StateMeasure) -> int:
        """Judge the state's flagged, not yet confirmed prompts by generation; returns their count.

        Call with the model at the weights ``state`` was measured at.
        """
        todo = [i for i, f in enumerate(state.flagged) if f and i not in state.confirmed]
        if not todo:
            return 0
        self.probe.model = model
        rank, world = rank_and_world()
        mine = todo[rank::world]
        verdicts, decoded = self.probe.judge_prompts(mine) if mine else ([], 0)
        votes = [0.0] * len(todo)
        for i, v in zip(mine, verdicts, strict=True):
            votes[todo.index(i)] = float(v)
        reduced = all_reduce_sum([*votes, float(decoded)], _model_device(model))
        for i, v in zip(todo, reduced[:-1], strict=True):
            state.confirmed[i] = v > 0.5
        return len(todo)

    def estimate(self, state: StateMeasure, exact: bool) -> PointEstimate:
        """The state's ASR rise over the baseline, paired prompt by prompt.

        ``exact``: the state's flagged prompts were judged by generation (:meth:`confirm`), so
        verdicts are compared with the judge's at θ₀; otherwise the forward flags are compared
        with the forward flags at θ₀ (which can only over-count unsafe answers).
        """
        if self.baseline is None:
            raise RuntimeError("GuardProbe.estimate() needs measure_baseline() first.")
        reference = self.baseline.unsafe if exact else self.baseline.flagged
        nll_rise = None
        if state.nll is not None and self.baseline.nll is not None:
            nll_rise = state.nll - self.baseline.nll
        if not state.finite:
            return PointEstimate(math.nan, math.nan, math.nan, nll_rise)
        return estimate(state.unsafe(exact), reference, nll_rise)
