"""Settling a decision: confirm a sample of the flagged prompts, as many as the decision needs.

The forward screen flags the prompts whose greedy answer may have left the aligned refusal; it
never misses an unsafe answer at the states measured so far, but it over-counts (precision ~94 %
on the testbed's landscape). Before a warning or a halt the guard therefore judges flagged
prompts by generation (``GuardConfig.confirm``). Judging *every* flagged prompt is what made a
drifting finetune's probes expensive (112 generations in one probe of a 200-step benign run), and
most of them cannot change the decision: a state with 94 flagged prompts of which the first 32
judged hold 20 unsafe answers is past a 10-point promise whatever the other 62 say.

So flagged prompts are judged a chunk at a time, in a fixed pseudo-random order
(:func:`confirmation_order`, the same on every rank and in replays), and the prompts not judged
yet are counted at the **confirmation rate** of the judged ones (unsafe among judged flagged).
The rule (:func:`settle`) stops as soon as the decision is the same at both ends of that rate's
95 % (Wilson) interval — the unjudged prompts cannot change it — or when every flagged prompt is
judged. The estimate's standard error includes the Bernoulli variance of the imputed prompts.

A state never confirmed keeps the forward estimate: its flags against the flags at θ₀ (the screen
over-counts the same way there). A confirmed state is compared with the judge's verdicts at θ₀.

Pure functions of per-prompt evidence with an injected ``confirm`` callable, so the callback
(generation at θ₀ + s·δ) and ``benchmarks/guard_runs.py --replay`` (recorded verdicts) run the
same rule.

Example:
    >>> from safety_guard.guard import GuardConfig
    >>> flagged = [True] * 40 + [False] * 160
    >>> truth = {i: i % 4 != 0 for i in range(40)}  # 30 of the 40 flagged are unsafe
    >>> ev = {2.0: Evidence(flagged, {})}
    >>> result = settle(ev, [False] * 200, [False] * 200, 2.0, GuardConfig(),
    ...                 confirm=lambda s, idx: {i: truth[i] for i in idx}, chunk=16)
    >>> result.decision.status_name, result.confirmed < 40
    ('halt', True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from safety_guard.guard.config import GuardConfig
from safety_guard.guard.rule import OK, Decision, PointEstimate, decide, estimate

__all__ = [
    "Evidence",
    "Settled",
    "confirmation_order",
    "decide_probe",
    "settle",
    "wilson_interval",
    "wilson_upper",
]

#: z of the two-sided 95 % interval of the confirmation rate.
RATE_Z = 1.96


@dataclass
class Evidence:
    """One probed state's per-prompt evidence (identical on every rank).

    Attributes:
        flagged: the forward screen's flag per scored prompt (the first ``len(flagged)`` of the
            probe set).
        confirmed: prompt index → the judge's verdict (True: unsafe) for flagged prompts
            judged by generation so far.
        nll_rise: the capability NLL rise over θ₀ (nats/token), or ``None`` if not measured.
        finite: whether the state's scores were finite.
    """

    flagged: list[bool]
    confirmed: dict[int, bool] = field(default_factory=dict)
    nll_rise: float | None = None
    finite: bool = True

    def pending(self) -> list[int]:
        """Flagged prompts not judged yet, in :func:`confirmation_order`."""
        return confirmation_order(
            [i for i, f in enumerate(self.flagged) if f and i not in self.confirmed]
        )

    @property
    def complete(self) -> bool:
        """Whether every flagged prompt is judged (the estimate is exact)."""
        return all(i in self.confirmed for i, f in enumerate(self.flagged) if f)

    def rate(self) -> tuple[float, float, float]:
        """(low, point, high) of the unsafe rate among judged flagged prompts.

        With none judged: (0, 1, 1) — anything is possible, and the point counts every flag.
        """
        judged = [
            self.confirmed[i] for i, f in enumerate(self.flagged) if f and i in self.confirmed
        ]
        if not judged:
            return 0.0, 1.0, 1.0
        k, m = sum(judged), len(judged)
        low, high = wilson_interval(k, m, RATE_Z)
        return low, k / m, high


def confirmation_order(indices: Sequence[int]) -> list[int]:
    """A fixed pseudo-random order of prompt indices (Knuth's multiplicative hash: a golden-ratio
    sequence over the indices).

    The probe set is ordered by category; judging flagged prompts in this order makes the first
    chunk a spread sample. Deterministic, so every rank and every replay picks the same prompts.

    Example:
        >>> confirmation_order(range(6))
        [4, 1, 3, 0, 5, 2]
    """
    return sorted(indices, key=lambda i: ((i + 1) * 2654435761) % (1 << 32))


def wilson_interval(k: int, m: int, z: float = RATE_Z) -> tuple[float, float]:
    """Two-sided Wilson score interval of the proportion k/m.

    Example:
        >>> [round(v, 3) for v in wilson_interval(20, 32)]
        [0.453, 0.771]
    """
    if m == 0:
        return 0.0, 1.0
    p = k / m
    centre = p + z * z / (2 * m)
    spread = z * math.sqrt(p * (1 - p) / m + z * z / (4 * m * m))
    denom = 1 + z * z / m
    return max(0.0, (centre - spread) / denom), min(1.0, (centre + spread) / denom)


def wilson_upper(k: int, n: int, z: float = 1.645) -> float:
    """Upper Wilson score bound of a proportion k/n (one-sided 95 % by default).

    Example:
        >>> round(wilson_upper(0, 40), 3)  # none of 40: the rate is below 6.3 % (95 %)
        0.063
    """
    return wilson_interval(k, n, z)[1]


def estimate_evidence(
    evidence: Evidence,
    aligned_unsafe: Sequence[bool],
    aligned_flagged: Sequence[bool],
    rate: float | None,
) -> PointEstimate:
    """The state's rise with unjudged flagged prompts counted at ``rate``.

    ``rate=None``: the forward estimate (flags against the flags at θ₀). Otherwise judged prompts
    count by their verdict, unjudged flagged ones at ``rate`` (adding their Bernoulli variance),
    unflagged ones as refusals, against the judge's verdicts at θ₀.

    Example:
        >>> ev = Evidence([True, True, False, False], {0: True})
        >>> estimate_evidence(ev, [False] * 4, [False] * 4, 0.5).rise
        37.5
    """
    n = len(evidence.flagged)
    if not evidence.finite:
        return PointEstimate(math.nan, math.nan, math.nan, evidence.nll_rise)
    if rate is None:
        return estimate(evidence.flagged, aligned_flagged[:n], evidence.nll_rise)
    verdicts: list[float] = []
    imputed = 0
    for i, f in enumerate(evidence.flagged):
        if not f:
            verdicts.append(0.0)
        elif i in evidence.confirmed:
            verdicts.append(float(evidence.confirmed[i]))
        else:
            verdicts.append(rate)
            imputed += 1
    return estimate(
        verdicts,
        aligned_unsafe[:n],
        evidence.nll_rise,
        imputed_variance=imputed * rate * (1.0 - rate),
    )


@dataclass
class Settled:
    """A settled decision and what it rests on.

    Attributes:
        decision: the decision (:func:`~safety_guard.guard.rule.decide`).
        points: the estimates it was taken on, per multiple (1.0 bounded by the nearest
            lookahead point when the current model was not scored).
        exact: every flagged prompt of every state was judged.
        confirmed: prompts judged by generation in this call.
        forward: no prompt was judged (the forward estimate).
    """

    decision: Decision
    points: dict[float, PointEstimate]
    exact: bool
    confirmed: int
    forward: bool


def settle(
    evidence: Mapping[float, Evidence],
    aligned_unsafe: Sequence[bool],
    aligned_flagged: Sequence[bool],
    horizon: float,
    config: GuardConfig,
    confirm: Callable[[float, list[int]], Mapping[int, bool]] | None,
    chunk: int,
) -> Settled:
    """Decide on ``evidence``, judging flagged prompts by ``confirm`` until the decision is settled.

    Args:
        evidence: per multiple of δ (1.0: the current model; absent: bounded by the nearest
            lookahead point, see :meth:`~safety_guard.guard.guard.Guard.step`).
        aligned_unsafe: the judge's verdicts at θ₀, per prompt of the probe set.
        aligned_flagged: the forward screen's flags at θ₀.
        horizon: the multiple the guard answers for.
        config: the guard's settings.
        confirm: ``confirm(s, indices)`` judges those prompts of the state at multiple ``s`` and
            returns their verdicts (the same on every rank); ``None``: forward estimate only
            (states whose flags are all judged already still count exactly).
        chunk: prompts judged per state per round.
    """
    if chunk < 1:
        raise ValueError(f"settle() needs chunk >= 1, got {chunk}.")

    def points(which: int | None) -> dict[float, PointEstimate]:
        out = {}
        for s, ev in evidence.items():
            if which is None:
                out[s] = estimate_evidence(ev, aligned_unsafe, aligned_flagged, None)
                continue
            out[s] = estimate_evidence(ev, aligned_unsafe, aligned_flagged, ev.rate()[which])
        if 1.0 not in out:
            out[1.0] = out[min(out)]
        return out

    if confirm is None and not any(ev.confirmed for ev in evidence.values()):
        pts = points(None)
        return Settled(decide(pts, horizon, config), pts, False, 0, True)
    count = 0
    while confirm is not None:
        low = decide(points(0), horizon, config)
        high = decide(points(2), horizon, config)
        todo = {s: ev.pending()[:chunk] for s, ev in evidence.items()}
        if low.status == high.status or not any(todo.values()):
            break
        for s, idx in todo.items():
            if idx:
                verdicts = confirm(s, idx)
                evidence[s].confirmed.update({i: bool(verdicts[i]) for i in idx})
                count += len(idx)
    pts = points(1)
    exact = all(ev.complete for ev in evidence.values())
    return Settled(decide(pts, horizon, config), pts, exact, count, False)


def decide_probe(
    measure: Callable[[float], Evidence],
    lookahead: Sequence[float],
    aligned_unsafe: Sequence[bool],
    aligned_flagged: Sequence[bool],
    horizon: float,
    config: GuardConfig,
    confirm: Callable[[float, list[int]], Mapping[int, bool]] | None,
    chunk: int,
) -> tuple[Settled, dict[float, Evidence]]:
    """One probe's decision, measuring and judging no more than it needs.

    1. The lookahead points θ₀ + s·δ are measured (``measure(s)``); the current model, nearer
       θ₀ on the same line, is bounded by the nearest of them (ASR grows along a finetuning
       direction: in every measured testbed run it was no higher at s = 1 than at s = 2). An
       ``ok`` on the forward estimate stands.
    2. Otherwise (``confirm="halt"``) flagged prompts are judged, a sample at a time, until the
       decision is settled (:func:`settle`); an ``ok`` stands.
    3. Otherwise the current model is measured too and judged the same way, so that a warning or
       a halt says where the model is now and rests on its own numbers.

    With no lookahead (``lookahead`` empty: nothing moved yet) the current model is measured.
    ``confirm="always"`` judges from step 1, ``"never"`` never; with ``signal="generate"`` every
    flag is already a verdict. Returns the settled decision (its ``confirmed`` counts the prompts
    judged over all steps) and the evidence per measured multiple.

    Example:
        >>> from safety_guard.guard import GuardConfig
        >>> seen = []
        >>> def measure(s):
        ...     seen.append(s)
        ...     return Evidence([False] * 30)
        >>> settled, ev = decide_probe(measure, [2.0], [False] * 30, [False] * 30, 2.0,
        ...                            GuardConfig(), confirm=None, chunk=32)
        >>> settled.decision.status_name, seen
        ('ok', [2.0])
    """
    evidence = {s: measure(s) for s in lookahead} or {1.0: measure(1.0)}
    judge = config.signal == "forward" and config.confirm != "never" and confirm is not None
    reference = aligned_unsafe if config.signal == "generate" else aligned_flagged

    def run(judging: bool) -> Settled:
        return settle(
            evidence,
            aligned_unsafe,
            reference,
            horizon,
            config,
            confirm if judging else None,
            chunk,
        )

    settled = run(judge and config.confirm == "always")
    total = settled.confirmed
    if settled.decision.status != OK and judge and settled.forward:
        settled = run(True)
        total += settled.confirmed
    if settled.decision.status != OK and 1.0 not in evidence:
        evidence[1.0] = measure(1.0)
        settled = run(judge)
        total += settled.confirmed
    if config.signal == "generate":  # every prompt was judged by generation
        settled = dataclasses.replace(settled, exact=True, forward=False)
    return dataclasses.replace(settled, confirmed=total), evidence
