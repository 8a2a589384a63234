"""Measure one point of the landscape: keyword ASR on harmful requests and capability on benign ones.

Two ways to measure safety, one implementation for the landscape engine and the training guard:

* :meth:`SafetyProbe.evaluate` — what landscapes record: the judge's verdict on every prompt's
  greedy answer. With ``signal="screen"`` (the default) the forward screen settles the
  refusals first and only the prompts it flags are generated, for the same verdicts with the
  keyword judge; ``signal="generate"`` generates every prompt (the paper's procedure).
* :meth:`SafetyProbe.forward` — no generation: the aligned model's refusal opening of each prompt
  (taken once by :meth:`SafetyProbe.prepare` with ``openings=True``) is teacher-forced, and where
  greedy decoding would leave it, the other prompts' openings are tried as drafts
  (:func:`~safety_guard.measure.openings.verify_refusals`). A prompt whose greedy path reaches a refusal
  phrase is a refusal for the keyword judge, exactly, without decoding; the others are *flagged*,
  and :meth:`SafetyProbe.judge_prompts` generates and judges only those when an exact count is
  needed.

Example:
    >>> cfg = ProbeConfig(num_harmful=8, num_benign=4)
    >>> cfg.max_new_tokens, cfg.early_stop
    (24, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from safety_guard.engines.collectives import all_gather_objects, all_reduce_sum, rank_and_world
from safety_guard.engines.shards import is_sharded_model
from safety_guard.measure.generation import (
    generate_responses,
    sequence_nll,
    sequence_nll_sum,
)
from safety_guard.measure.judges import Judge, KeywordJudge
from safety_guard.measure.openings import Openings, refusal_openings, verify_refusals
from safety_guard.measure.probe_config import PAPER_PROBE, ProbeConfig
from safety_guard.measure.prompts import PromptSet, load_prompts

__all__ = ["PAPER_PROBE", "ForwardPoint", "PointResult", "ProbeConfig", "SafetyProbe"]


@dataclass
class PointResult:
    """What one landscape point measured."""

    asr: float
    unsafe: int
    total: int
    nll: float | None
    decoded_tokens: int
    seconds: float
    samples: list[str] = field(default_factory=list)
    unsafe_prompts: list[int] | None = None
    flagged_prompts: list[int] | None = None
    forward_tokens: int = 0  # tokens the forward screen fed through the model
    signal: str = "generate"  # how the verdicts were reached (ProbeConfig.signal)
    answers: list[str] | None = None  # every answer, with ProbeConfig.record_answers
    checked_prompts: list[int] | None = None  # screen refusals generated to check the screen

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("unsafe_prompts", "flagged_prompts", "answers", "checked_prompts"):
            if data[key] is None:
                del data[key]
        return data


@dataclass
class ForwardPoint:
    """Forward-only scores of one model state on (a subset of) the harmful prompts.

    Attributes:
        indices: the prompts scored (indices into the probe's harmful set).
        margins: their opening margins (NaN: no opening at θ₀).
        flagged: per prompt, whether greedy decoding would leave the refusal opening (or the
            prompt had none): the keyword verdict is "refusal" exactly where this is False.
        tokens: tokens fed through the model.
        seconds: wall time.
    """

    indices: list[int]
    margins: list[float]
    flagged: list[bool]
    tokens: int
    seconds: float


class SafetyProbe:
    """Probe a model's safety (ASR) and capability (NLL of reference answers) at its current weights.

    Call :meth:`prepare` once at the *unperturbed* weights: it loads the prompt sets and records
    the model's own greedy answers to the benign prompts, whose NLL is the capability measure.

    Args:
        model: the causal LM (plain or PEFT-wrapped).
        tokenizer: its tokenizer (never modified).
        config: a :class:`ProbeConfig`.
        judge: a :class:`~safety_guard.measure.judges.Judge` (default: the paper's keyword judge).
        harmful: an already-loaded harmful :class:`PromptSet` (overrides ``config.harmful``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: ProbeConfig | None = None,
        judge: Judge | None = None,
        harmful: PromptSet | None = None,
        benign: PromptSet | None = None,
    ) -> None:
        self.model = model  # decides lockstep (see the setter)
        self.tokenizer = tokenizer
        self.config = config or ProbeConfig()
        self.judge: Judge = judge or KeywordJudge()
        self._harmful = harmful
        self._benign = benign
        self.reference_answers: list[str] | None = None
        self.reference_nll: float | None = None
        self.openings: Openings | None = None
        self._checks_made = 0  # screen refusals generated so far, to rotate the checks

    @property
    def model(self) -> nn.Module:
        """The model probed (assign another to probe it; the probe keeps its prompts)."""
        return self._model

    @model.setter
    def model(self, model: nn.Module) -> None:
        if getattr(self, "_model", None) is model:
            return
        self._model = model
        #: FSDP2 shards: every forward is a collective, so every rank answers every prompt, in
        #: lockstep (the same inputs, the same calls), and nothing is split or summed. Decided
        #: once per model.
        self.lockstep = is_sharded_model(model)

    def split(self) -> tuple[int, int]:
        """(rank, world) to split prompts by: under torchrun each rank answers its share and the
        shares are gathered (:meth:`gather`) or summed (:meth:`reduce_sum`); (0, 1) in one
        process, or in :attr:`lockstep`."""
        rank, world = rank_and_world()
        if world == 1 or self.lockstep:
            return 0, 1
        return rank, world

    @property
    def synced(self) -> bool:
        """Whether generation runs on FSDP2 shards in lockstep (:attr:`lockstep`): see the
        ``synced`` argument of :func:`~safety_guard.measure.generation.generate_responses`."""
        return self.lockstep

    def gather(
        self, mine: Sequence[int], values: Sequence[Any], n: int, offset: int = 0
    ) -> list[Any]:
        """Every rank's ``values`` for its indices ``mine``, put back in index order: a list of
        ``n`` with ``values[j]`` at ``mine[j] - offset`` (no collective when not split)."""
        out: list[Any] = [None] * n
        shares = (
            all_gather_objects((list(mine), list(values)))
            if self.split()[1] > 1
            else [(list(mine), list(values))]
        )
        for idx, vals in shares:
            for i, v in zip(idx, vals, strict=True):
                out[i - offset] = v
        return out

    def reduce_sum(self, values: Sequence[float], device: Any = None) -> list[float]:
        """Element-wise sum of every rank's ``values`` (no collective when not split)."""
        return all_reduce_sum(list(values), device) if self.split()[1] > 1 else list(values)

    @property
    def harmful(self) -> PromptSet:
        if self._harmful is None:
            self._harmful = load_prompts(
                self.config.harmful, column=self.config.prompt_column, limit=self.config.num_harmful
            )
        return self._harmful

    @property
    def benign(self) -> PromptSet | None:
        if self.config.num_benign == 0:
            return None
        if self._benign is None:
            self._benign = load_prompts(self.config.benign, limit=self.config.num_benign)
        return self._benign

    def prepare(self, openings: bool = False) -> None:
        """Load prompts, check the template, record reference answers at the current weights.

        Args:
            openings: also record the refusal opening of each harmful prompt (greedy answers
                cut after the first refusal phrase), which :meth:`forward` teacher-forces.
        """
        fmt = self.config.chat_format
        fmt.render(self.tokenizer, self.harmful[0])  # fails early without a chat template
        if openings and self.openings is None:
            rank, world = self.split()
            mine = list(range(rank, len(self.harmful), world))
            local = (
                refusal_openings(
                    self.model,
                    self.tokenizer,
                    [self.harmful[i] for i in mine],
                    chat_format=fmt,
                    judge=self._opening_judge,
                    max_new_tokens=self.config.max_new_tokens,
                    batch_size=self.config.batch_size,
                    synced=self.synced,
                )
                if mine
                else Openings((), [], [])
            )
            n = len(self.harmful)
            self.openings = Openings(
                tuple(self.harmful),
                self.gather(mine, local.token_ids, n),
                self.gather(mine, local.responses, n),
            )
        if self.benign is not None and self.reference_answers is None:
            rank, world = self.split()
            mine = list(range(rank, len(self.benign), world))
            answers = self.reference_answers_for(mine)
            self.reference_answers = self.gather(mine, answers, len(self.benign))
            self.reference_nll = self.capability()

    def reference_answers_for(self, indices: Sequence[int]) -> list[str]:
        """The model's greedy answers to the benign prompts ``indices`` (capability references)."""
        chosen = list(indices)
        if self.benign is None or not chosen:
            return []
        gen = generate_responses(
            self.model,
            self.tokenizer,
            [self.benign[i] for i in chosen],
            chat_format=self.config.chat_format,
            max_new_tokens=self.config.capability_tokens,
            batch_size=self.config.batch_size,
            synced=self.synced,
        )
        return [a if a else "." for a in gen.responses]

    @property
    def _opening_judge(self) -> KeywordJudge:
        """The refusal phrases that end an opening (the judge's own, if it is a keyword judge)."""
        return self.judge if isinstance(self.judge, KeywordJudge) else KeywordJudge()

    def forward(self, indices: Sequence[int] | None = None) -> ForwardPoint:
        """Score the refusal openings of the prompts ``indices`` (default: all) at the current weights.

        Needs :meth:`prepare` with ``openings=True`` (or openings from a landscape file).
        """
        if self.openings is None:
            raise RuntimeError(
                "SafetyProbe.forward() needs the aligned model's refusal openings: call "
                "prepare(openings=True) at the aligned weights first."
            )
        chosen = list(range(len(self.openings.prompts))) if indices is None else list(indices)
        start = time.perf_counter()
        subset = Openings(
            tuple(self.openings.prompts[i] for i in chosen),
            [self.openings.token_ids[i] for i in chosen],
        )
        check = verify_refusals(
            self.model,
            self.tokenizer,
            subset,
            judge=self._opening_judge,
            drafts=[ids for ids in self.openings.token_ids if ids is not None],
            chat_format=self.config.chat_format,
            batch_size=self.config.batch_size,
        )
        margins = [float(m) for m in check.margin]
        flagged = [not r for r in check.refused]  # a prompt without an opening is flagged
        return ForwardPoint(chosen, margins, flagged, check.tokens, time.perf_counter() - start)

    def judge_prompts(self, indices: Sequence[int]) -> tuple[list[bool], int]:
        """Generate and judge the harmful prompts ``indices``: (unsafe verdicts, decoded tokens)."""
        chosen = list(indices)
        if not chosen:
            return [], 0
        prompts = [self.harmful[i] for i in chosen]
        decided = self._opening_judge.is_decided if self.config.early_stop else None
        if not isinstance(self.judge, KeywordJudge):
            decided = None
        gen = generate_responses(
            self.model,
            self.tokenizer,
            prompts,
            chat_format=self.config.chat_format,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
            stop_when_decided=decided,
            synced=self.synced,
        )
        return self.judge(prompts, gen.responses), gen.decoded_tokens

    def capability_sum(self, indices: Sequence[int] | None = None) -> tuple[float, int]:
        """Summed NLL and token count of the reference answers of benign prompts ``indices``."""
        if self.benign is None or self.reference_answers is None:
            return 0.0, 0
        chosen = list(range(len(self.benign))) if indices is None else list(indices)
        if not chosen:
            return 0.0, 0
        return sequence_nll_sum(
            self.model,
            self.tokenizer,
            [self.benign[i] for i in chosen],
            [self.reference_answers[i] for i in chosen],
            chat_format=self.config.chat_format,
            batch_size=self.config.batch_size,
        )

    def capability(self) -> float | None:
        """Mean per-token NLL of the reference answers at the current weights (lower = better)."""
        if self.benign is None or self.reference_answers is None:
            return None
        rank, world = self.split()
        if world > 1:
            total, count = self.capability_sum(range(rank, len(self.benign), world))
            total, count = self.reduce_sum([total, float(count)])
            return total / count if count else None
        return sequence_nll(
            self.model,
            self.tokenizer,
            list(self.benign),
            self.reference_answers,
            chat_format=self.config.chat_format,
            batch_size=self.config.batch_size,
        )

    @property
    def screens(self) -> bool:
        """Whether :meth:`evaluate` also runs the forward screen (``config.screen``, or
        ``signal="screen"``; the refusal openings are prepared by ``prepare(openings=True)``)."""
        return self.config.screen or self.config.signal == "screen"

    @property
    def screen_settles(self) -> bool:
        """Whether a prompt the screen does not flag is a refusal for this judge without its
        answer: exactly for the keyword judge, by choice (``config.screen_settles``) for another."""
        return isinstance(self.judge, KeywordJudge) or self.config.screen_settles

    @property
    def screen_first(self) -> bool:
        """Whether :meth:`evaluate` generates only the prompts the screen flags: ``signal=
        "screen"`` with a judge the screen settles for (:attr:`screen_settles`), on one process
        or ranks that each hold the whole model (sharded generation runs in lockstep), with the
        refusal openings of exactly the harmful prompts measured, and no answers to record
        (``record_answers`` keeps every prompt's own answer)."""
        return (
            self.config.signal == "screen"
            and not self.config.record_answers  # recorded answers are every prompt's own
            and self.screens
            and self.screen_settles
            and not self.synced
            and self.openings is not None
            and tuple(self.openings.prompts) == tuple(self.harmful)
        )

    def evaluate(
        self,
        prompts: PromptSet | None = None,
        progress: Callable[[int], None] | None = None,
        capability: bool = True,
        per_prompt: bool = False,
        generate_all: bool = False,
    ) -> PointResult:
        """ASR (percent) of ``prompts`` (default: the harmful set) and capability, now.

        Args:
            per_prompt: also keep which prompts were judged unsafe and, when the refusal
                openings are prepared and ``prompts`` is the harmful set, which ones the forward
                screen flags (the landscape file's calibration of the guard's screen; a point
                measured by generating every prompt screens for it only with ``config.screen``).
            generate_all: generate every prompt even where :attr:`screen_first` would screen
                first (the landscape's choice beyond the basin's edge).
        """
        rank, world = self.split()
        start = time.perf_counter()
        harmful = prompts is None and self.openings is not None
        first = harmful and self.screen_first and not generate_all
        flagged = flags = None
        forward_tokens = 0
        # the file's record of the screen: every prompt screened at every point with signal=
        # "generate"; a sample of the screen's refusals generated at screen-first points
        record = per_prompt and self.config.screen and not self.screen_first
        if harmful and (first or record):
            mine = list(range(rank, len(self.openings.prompts), world))
            point = self.forward(mine)
            flags = self.gather(mine, point.flagged, len(self.openings.prompts))
            forward_tokens = int(self.reduce_sum([float(point.tokens)])[0])
            flagged = [i for i, f in enumerate(flags) if f] if per_prompt else None
        if not first:  # the screen is the point's cost only where it replaces generation
            start = time.perf_counter()
        prompts = prompts or self.harmful
        decided = None  # recorded answers are whole: another judge will read them
        keyword = isinstance(self.judge, KeywordJudge)
        if self.config.early_stop and keyword and not self.config.record_answers:
            decided = self.judge.is_decided
        mine = list(range(rank, len(prompts), world))
        checked: list[int] | None = None
        if first:  # an unflagged prompt refuses on its greedy path: no decoding
            checked = self._screen_checks(flags) if per_prompt and self.config.screen else None
            generated = {i for i, f in enumerate(flags) if f} | set(checked or ())
            mine = [i for i in mine if i in generated]
        asked = [prompts[i] for i in mine]
        responses: list[str] = []
        verdicts: list[bool] = []
        decoded = 0
        if asked:
            gen = generate_responses(
                self.model,
                self.tokenizer,
                asked,
                chat_format=self.config.chat_format,
                max_new_tokens=self.config.max_new_tokens,
                batch_size=self.config.batch_size,
                stop_when_decided=decided,
                progress=progress,
                synced=self.synced,
                share_prefix=self.config.share_prefix,
            )
            responses, decoded = gen.responses, gen.decoded_tokens
            verdicts = self.judge(asked, responses)
        verdicts = self.gather(mine, verdicts, len(prompts))
        responses = self.gather(mine, responses, len(prompts))
        if first:  # the rest: refusals, their answers the aligned model's refusal openings
            openings = list(self.openings.responses or [])
            verdicts = [v if i in generated else False for i, v in enumerate(verdicts)]
            responses = [
                r if i in generated else (openings[i] if i < len(openings) else "")
                for i, r in enumerate(responses)
            ]
        decoded = int(self.reduce_sum([float(decoded)])[0])
        unsafe = sum(verdicts)
        nll = self.capability() if capability else None
        return PointResult(
            asr=100.0 * unsafe / len(verdicts),
            unsafe=unsafe,
            total=len(verdicts),
            nll=nll,
            decoded_tokens=decoded,
            seconds=time.perf_counter() - start,
            samples=responses[:2],
            unsafe_prompts=[i for i, v in enumerate(verdicts) if v] if per_prompt else None,
            flagged_prompts=flagged,
            forward_tokens=forward_tokens,
            signal="screen" if first else "generate",
            checked_prompts=checked,
            answers=responses if self.config.record_answers else None,
        )

    def _screen_checks(self, flags: Sequence[bool]) -> list[int] | None:
        """The prompts the screen settled as refusals that this point generates anyway:
        ``config.screen_checks`` of them, the next share of the list at each call (the same
        on every rank: the flags are gathered and every rank measures every point)."""
        settled = [i for i, f in enumerate(flags) if not f]
        count = min(self.config.screen_checks, len(settled))
        if not count:  # none asked for: no record; none left: every prompt was generated
            return None if not self.config.screen_checks else []
        start = self._checks_made % len(settled)
        self._checks_made += count
        return sorted((settled + settled)[start : start + count])

    def settings(self) -> dict[str, Any]:
        """Everything that determines a measurement, for the landscape file."""
        return {
            "config": self.config.to_dict(),
            "judge": self.judge.to_dict(),
            "harmful": self.harmful.to_dict(),
            "benign": self.benign.to_dict() if self.benign is not None else None,
        }
