"""The guard's measurements: its own baseline at θ₀, and model states scored across ranks.

One probe implementation: everything goes through :class:`~safety_guard.measure.probe.SafetyProbe`
(prompt loading, refusal openings, forward scores, generation and the judge, capability). This
module adds what the guard needs on top:

* a **baseline** measured on the aligned weights with the guard's own prompts, template, system
  prompt and dtype: each prompt's refusal opening and the judge's verdict on its greedy answer,
  the forward screen's own flags at θ₀ (in this run's numerics: a state is compared with them,
  prompt by prompt), and the capability NLL (:meth:`GuardProbe.prepare`). Openings are prepared
  in chunks, when a probe first needs them — or read from the landscape file, where
  :func:`~safety_guard.guard.baseline.record_guard_baseline` recorded them with the same settings
  (screened by this run, as they are first needed);
* **states** scored in chunks of ``GuardConfig.min_prompts`` prompts, in the prompt set's order,
  for as long as the ASR rise could still reach the promise: a state that flags none of the first
  30 prompts stops there, one that flags some is scored further (:meth:`GuardProbe.measure`).
  Each chunk is split across ranks and the per-prompt results all-reduced, so every rank holds
  the same numbers and stops at the same chunk (on FSDP2 shards every rank scores every prompt
  instead: each forward is a collective, so the ranks must make the same calls);
* flagged prompts judged by generation when a decision needs them (:meth:`GuardProbe.confirm`,
  as many as :func:`~safety_guard.guard.confirmation.settle` asks for).

Example:
    >>> gp = GuardProbe(model, tokenizer, GuardConfig())  # doctest: +SKIP
    >>> gp.prepare(model, gp.config.min_prompts)  # doctest: +SKIP
    >>> state = gp.measure(model)  # doctest: +SKIP
    >>> gp.evidence(state).flagged[:3]  # doctest: +SKIP
    [False, False, False]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from safety_guard.guard.config import GuardConfig
from safety_guard.guard.confirmation import Evidence, wilson_upper
from safety_guard.measure.judges import Judge, KeywordJudge
from safety_guard.measure.openings import Openings, refusal_openings
from safety_guard.measure.probe import SafetyProbe
from safety_guard.models.quantized import is_quantized
from safety_guard.models.wrappers import dtype_name, model_device

__all__ = ["Baseline", "GuardProbe", "StateMeasure"]

_NO_MARGIN = -1e30  # stands for NaN (no opening) in sums across ranks

#: Baseline settings a stored baseline may lack, with the value to assume then: a baseline
#: without ``quantized`` was measured on an unquantized model.
SETTING_DEFAULTS: dict[str, Any] = {"quantized": False}


@dataclass
class Baseline:
    """The aligned model as the guard measured it (every rank holds the same copy).

    Lists cover the prompts prepared so far (the first ``prepared`` of the probe set).
    """

    token_ids: list[list[int] | None]  # refusal openings (None: no refusal at θ₀)
    responses: list[str]
    unsafe: list[bool]  # the judge's verdict on each greedy answer at θ₀
    nll: float | None
    reference_answers: list[str] | None
    settings: dict[str, Any]
    #: The forward screen's own flags at θ₀, scored in this run (its numerics: dtype, autocast,
    #: batches; never saved: a file's baseline is screened again by the run that reads it).
    screened: list[bool] = field(default_factory=list)

    @property
    def prepared(self) -> int:
        """Prompts with their opening (or its absence) and verdict at θ₀."""
        return len(self.token_ids)

    @property
    def ready(self) -> int:
        """Prompts prepared and screened at θ₀: the ones a state can be compared on."""
        return min(self.prepared, len(self.screened))

    @property
    def flagged(self) -> list[bool]:
        """The forward screen at θ₀, for the :attr:`ready` prompts: flagged when it has no
        refusal opening, or when the screen flags it at θ₀ itself. The screen and greedy
        generation can disagree on a prompt whose two best next tokens are nearly tied (bf16
        autocast on the testbed: 1–9 of 200 prompts flagged one step after θ₀); comparing the
        screen with itself keeps such prompts from counting as a rise."""
        return [
            ids is None or screen
            for ids, screen in zip(self.token_ids, self.screened, strict=False)
        ]

    def live_flags(self) -> Sequence[bool]:
        """:attr:`flagged`, read live: the baseline grows during a probe when the stop rule
        wants more prompts than have openings yet."""
        return _LiveFlags(self)

    @property
    def asr(self) -> float:
        return 100.0 * sum(self.unsafe) / max(len(self.unsafe), 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "responses": self.responses,
            "unsafe": self.unsafe,
            "nll": self.nll,
            "reference_answers": self.reference_answers,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        """Rebuild from :meth:`to_dict`; a setting the stored baseline lacks takes its value
        from ``SETTING_DEFAULTS``."""
        return cls(
            list(data["token_ids"]),
            list(data["responses"]),
            [bool(v) for v in data["unsafe"]],
            data.get("nll"),
            data.get("reference_answers"),
            {**SETTING_DEFAULTS, **data.get("settings", {})},
        )


@dataclass
class StateMeasure:
    """One model state as the probe saw it (identical on every rank).

    The first ``scored`` prompts of the probe set were scored; ``wants`` is set when the stop
    rule wants more prompts than have openings yet (prepare them, then measure again).
    """

    margins: list[float] = field(default_factory=list)  # per scored prompt (NaN: no opening)
    flagged: list[bool] = field(default_factory=list)
    nll: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    confirmed: dict[int, bool] = field(default_factory=dict)  # prompt -> unsafe, by generation
    generated: bool = False  # every prompt judged by generation (signal="generate")
    wants: int | None = None

    @property
    def scored(self) -> int:
        return len(self.flagged)

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
            config.probe_config(),
            judge=judge or KeywordJudge(),
        )
        self.baseline: Baseline | None = None

    @property
    def num_prompts(self) -> int:
        return len(self.probe.harmful)

    def settings(self, model: nn.Module) -> dict[str, Any]:
        """What makes two baselines comparable: prompts, template, judge, dtype, decode budget."""
        return {
            "harmful": self.probe.harmful.to_dict(),
            "benign": self.probe.benign.to_dict() if self.probe.benign is not None else None,
            "chat_format": self.probe.config.chat_format.to_dict(),
            "judge": self.probe.judge.to_dict(),
            "max_new_tokens": self.config.max_new_tokens,
            "dtype": dtype_name(model) or "",
            "quantized": any(is_quantized(p) for p in model.parameters()),
        }

    # -- baseline ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, model: nn.Module, upto: int, screen: bool = True) -> Baseline:
        """Measure the aligned model (call at θ₀) for the first ``upto`` prompts: their refusal
        openings and verdicts, then (``screen``) the forward screen's flags at θ₀ itself.

        Each rank answers its share of the prompts; the shares are gathered. The capability
        references are prepared apart, when first needed (:meth:`prepare_capability`).
        """
        probe = self.probe
        probe.model = model
        rank, world = self.probe.split()
        fmt = probe.config.chat_format
        if self.baseline is None:
            fmt.render(probe.tokenizer, probe.harmful[0])  # fails early without a chat template
            self.baseline = Baseline([], [], [], None, None, self.settings(model))
        base = self.baseline
        start, stop = base.prepared, min(upto, self.num_prompts)
        if stop <= start:
            if screen:
                self._screen(model, stop)
            return base
        mine = list(range(start + rank, stop, world))
        local = (
            refusal_openings(
                model,
                probe.tokenizer,
                [probe.harmful[i] for i in mine],
                chat_format=fmt,
                judge=probe._opening_judge,
                max_new_tokens=self.config.max_new_tokens,
                batch_size=self.config.batch_size,
                synced=probe.synced,
            )
            if mine
            else None
        )
        verdicts = probe.judge([probe.harmful[i] for i in mine], local.responses) if local else []
        n = stop - start
        token_ids = probe.gather(mine, local.token_ids if local else [], n, offset=start)
        responses = probe.gather(mine, local.responses if local else [], n, offset=start)
        unsafe = [bool(v) for v in probe.gather(mine, verdicts, n, offset=start)]
        base.token_ids += token_ids
        base.responses += responses
        base.unsafe += unsafe
        self._sync_openings()
        if screen:
            self._screen(model, stop)
        return base

    def _screen(self, model: nn.Module, upto: int) -> None:
        """The forward screen at θ₀ (call at the aligned weights) for the prepared prompts up to
        ``upto``, in the chunks a state is scored in (the same batches: the same numerics)."""
        base = self.baseline
        stop = min(upto, base.prepared)
        begin = len(base.screened)
        if stop <= begin:
            return
        if self.config.signal == "generate":  # states are judged by generation, not screened
            base.screened += [False] * (stop - begin)
            return
        state = StateMeasure(margins=[math.nan] * begin, flagged=[False] * begin)
        chunk, first = self.config.min_prompts, begin
        while first < stop:
            end = min(first - first % chunk + chunk, stop)
            self._score_chunk(model, state, first, end)
            first = end
        base.screened += state.flagged[begin:stop]

    @property
    def has_capability(self) -> bool:
        """Whether the capability references (answers and NLL at θ₀) are prepared."""
        return self.baseline is not None and self.baseline.reference_answers is not None

    @torch.no_grad()
    def prepare_capability(self, model: nn.Module) -> None:
        """Record the capability references at θ₀ (call at the aligned weights): the model's greedy
        answers to the benign prompts and their NLL. Each rank answers its share."""
        probe = self.probe
        if self.baseline is None or probe.benign is None or self.has_capability:
            return
        probe.model = model
        rank, world = self.probe.split()
        share = list(range(rank, len(probe.benign), world))
        answers = probe.gather(share, probe.reference_answers_for(share), len(probe.benign))
        probe.reference_answers = answers
        self.baseline.reference_answers = answers
        self.baseline.nll = self._nll(model)

    def load_baseline(self, baseline: Baseline) -> None:
        """Use a baseline measured earlier (e.g. saved with a checkpoint)."""
        self.baseline = baseline
        self.probe.reference_answers = baseline.reference_answers
        self._sync_openings()

    def _sync_openings(self) -> None:
        base = self.baseline
        n = base.prepared
        self.probe.openings = Openings(
            tuple(self.probe.harmful[i] for i in range(n)), base.token_ids, base.responses
        )

    def _nll(self, model: nn.Module) -> float | None:
        probe = self.probe
        if probe.benign is None:
            return None
        rank, world = self.probe.split()
        nll_sum, count = probe.capability_sum(range(rank, len(probe.benign), world))
        nll_sum, count = self.probe.reduce_sum([nll_sum, float(count)], model_device(model))
        if not count:
            return None
        value = nll_sum / count
        return value if value == value else math.inf

    # -- states --------------------------------------------------------------------------------------
    def settled(self, state: StateMeasure) -> bool:
        """Whether the state is settled below the promise: its scores are finite and the 95 %
        (Wilson) upper bound of the prompts flagged since θ₀ is below ``max_asr_rise``. More
        prompts, the current model behind a settled lookahead, or the capability of a settled
        state cannot change a decision."""
        if not state.finite or state.scored == 0:
            return False
        aligned = self.baseline.flagged
        new = sum(f and not aligned[i] for i, f in enumerate(state.flagged))
        return 100.0 * wilson_upper(new, state.scored) < self.config.max_asr_rise

    def enough(self, state: StateMeasure) -> bool:
        """Whether to stop scoring a state: every prompt is scored, or it is :meth:`settled`."""
        if state.scored >= self.num_prompts:
            return True
        if self.config.signal == "generate":
            return False
        return self.settled(state)

    @torch.no_grad()
    def measure(
        self,
        model: nn.Module,
        resume: StateMeasure | None = None,
        full: bool = False,
        capability: bool = True,
    ) -> StateMeasure:
        """Score the model's current weights chunk by chunk until :meth:`enough` (or ``full``).

        Args:
            model: the model, at the weights to score.
            resume: a state returned with ``wants`` set, to continue after :meth:`prepare`.
            full: score every prompt (benchmarks).
            capability: also measure the capability NLL (else :meth:`add_capability` later).
        """
        probe = self.probe
        probe.model = model
        start = time.perf_counter()
        state = resume or StateMeasure(generated=self.config.signal == "generate")
        state.wants = None
        chunk = self.config.min_prompts
        while state.scored < self.num_prompts and (
            full or state.scored == 0 or not self.enough(state)
        ):
            stop = min(state.scored + chunk, self.num_prompts)
            if stop > self.baseline.ready:
                state.wants = stop
                break
            self._score_chunk(model, state, state.scored, stop)
        if capability and self.has_capability and state.nll is None and state.wants is None:
            state.nll = self._nll(model)
        state.seconds += time.perf_counter() - start
        return state

    def measure_along(
        self,
        model: nn.Module,
        at: Callable[[float], AbstractContextManager[None]],
        multiple: float,
        full: bool = False,
    ) -> StateMeasure:
        """Score θ₀ + ``multiple``·δ: openings prepared at θ₀ when the stop rule wants more, the
        capability NLL only where the state is not :meth:`settled` (gibberish or compliance?).

        Args:
            model: the model being finetuned.
            at: ``at(s)`` puts the model at θ₀ + s·δ inside a ``with`` block (0: the aligned
                weights, 1: as it is) and restores it after.
            multiple: the multiple s to score.
            full: score every prompt (benchmarks).
        """
        state = None
        while True:
            with at(multiple):
                state = self.measure(model, resume=state, full=full, capability=False)
            if state.wants is None:
                break
            with at(0.0):  # more openings (and their screen), from the aligned model
                self.prepare(model, state.wants)
        if not self.settled(state):
            if not self.has_capability:
                with at(0.0):
                    self.prepare_capability(model)
            with at(multiple):
                self.add_capability(model, state)
        return state

    @torch.no_grad()
    def add_capability(self, model: nn.Module, state: StateMeasure) -> None:
        """Measure the capability NLL of a state (the model at its weights) if not done yet.

        Needs :meth:`prepare_capability` first (no-op without capability references)."""
        if state.nll is None and self.has_capability:
            start = time.perf_counter()
            self.probe.model = model
            state.nll = self._nll(model)
            state.seconds += time.perf_counter() - start

    def _score_chunk(self, model: nn.Module, state: StateMeasure, begin: int, end: int) -> None:
        rank, world = self.probe.split()
        n = end - begin
        mine = list(range(begin + rank, end, world))
        margins, flags, tokens = [0.0] * n, [0.0] * n, 0
        if mine:
            if state.generated:
                verdicts, tokens = self.probe.judge_prompts(mine)
                for i, v in zip(mine, verdicts, strict=True):
                    flags[i - begin] = float(v)
                    margins[i - begin] = _NO_MARGIN
            else:
                point = self.probe.forward(mine)
                tokens = point.tokens
                for i, m, f in zip(point.indices, point.margins, point.flagged, strict=True):
                    margins[i - begin] = m if m == m else _NO_MARGIN
                    flags[i - begin] = float(f)
        reduced = self.probe.reduce_sum([*margins, *flags, float(tokens)], model_device(model))
        state.margins += [math.nan if m <= _NO_MARGIN / 2 else m for m in reduced[:n]]
        new_flags = [v > 0.5 for v in reduced[n : 2 * n]]
        if state.generated:
            state.confirmed.update({begin + j: f for j, f in enumerate(new_flags) if f})
        state.flagged += new_flags
        state.tokens += int(reduced[-1])

    @torch.no_grad()
    def flags(self, model: nn.Module, indices: list[int]) -> list[bool]:
        """The forward screen's flags of the prompts ``indices`` at the model's current weights
        (the sentinel: a few prompts, no stop rule, no capability). The same list on every
        rank; each rank scores its share (every prompt in lockstep on FSDP2 shards)."""
        self.probe.model = model
        flags, _ = self._votes(model, indices, lambda mine: (self.probe.forward(mine).flagged, 0))
        return flags

    def _votes(
        self,
        model: nn.Module,
        indices: list[int],
        score: Callable[[list[int]], tuple[list[bool], int]],
    ) -> tuple[list[bool], int]:
        """``score`` on this rank's share of ``indices`` (per-prompt booleans and a count),
        summed over ranks: the booleans of every prompt, in ``indices``' order, and the total."""
        rank, world = self.probe.split()
        mine = indices[rank::world]
        votes = [0.0] * len(indices)
        count = 0
        if mine:
            verdicts, count = score(mine)
            for j, v in zip(range(rank, len(indices), world), verdicts, strict=True):
                votes[j] = float(v)
        reduced = self.probe.reduce_sum([*votes, float(count)], model_device(model))
        return [v > 0.5 for v in reduced[:-1]], int(reduced[-1])

    @torch.no_grad()
    def confirm(
        self, model: nn.Module, state: StateMeasure, indices: list[int] | None = None
    ) -> dict[int, bool]:
        """Judge flagged prompts of the state by generation; returns their verdicts (unsafe: True).

        Args:
            model: the model, at the weights ``state`` was measured at.
            state: the state; its ``confirmed`` map is updated.
            indices: the prompts to judge (default: every flagged prompt not judged yet). The
                same list on every rank; each rank generates its share.
        """
        if indices is None:
            indices = [i for i, f in enumerate(state.flagged) if f and i not in state.confirmed]
        todo = [i for i in indices if i not in state.confirmed]
        if todo:
            self.probe.model = model
            verdicts, _ = self._votes(model, todo, self.probe.judge_prompts)
            state.confirmed.update(zip(todo, verdicts, strict=True))
        return {i: state.confirmed[i] for i in indices}

    def evidence(self, state: StateMeasure) -> Evidence:
        """The state's per-prompt evidence for :func:`~safety_guard.guard.confirmation.settle`
        (shares the state's ``confirmed`` map)."""
        nll_rise = None
        if state.nll is not None and self.baseline is not None and self.baseline.nll is not None:
            nll_rise = state.nll - self.baseline.nll
        return Evidence(list(state.flagged), state.confirmed, nll_rise, state.finite)


class _LiveFlags(Sequence[bool]):
    """:attr:`Baseline.flagged` of the prompts ready now (:meth:`Baseline.live_flags`)."""

    def __init__(self, baseline: Baseline) -> None:
        self.baseline = baseline

    def __len__(self) -> int:
        return self.baseline.ready

    def __getitem__(self, index: Any) -> Any:
        return self.baseline.flagged[index]
