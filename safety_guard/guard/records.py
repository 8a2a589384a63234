"""The guard's records: a cheap check (:class:`CheckRecord`) and a probe (:class:`ProbeRecord`,
with a :class:`PointRecord` per point θ₀ + s·δ it measured), typed for the code that reads them
(the guard, its summary and plot, the demo's report) and JSON in the trajectory file, one
``to_json``/``from_json`` each; and the ``safety/*`` metrics of a probe.

Example:
    >>> check = CheckRecord(step=3, displacement=0.01, cosine=None)
    >>> check.to_json()
    {'step': 3, 'event': 'check', 'displacement': 0.01, 'cosine': None}
    >>> record_from_json(check.to_json()) == check
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from safety_guard.guard.cadence import sentinel_prompts
from safety_guard.guard.confirmation import Settled
from safety_guard.guard.probing import StateMeasure
from safety_guard.guard.rule import STATUS_NAMES, Decision, PointEstimate

__all__ = [
    "CheckRecord",
    "PointRecord",
    "ProbeRecord",
    "probe_metrics",
    "probe_record",
    "record_from_json",
    "sentinels_of",
]


@dataclasses.dataclass
class CheckRecord:
    """A cheap check: the displacement, its direction against the last probe's (cosine), and
    the sentinel's re-score when one ran (``{"flips", "of", "seconds"}``)."""

    step: int
    displacement: float
    cosine: float | None
    sentinel: dict[str, Any] | None = None
    event = "check"

    def to_json(self) -> dict[str, Any]:
        data = {"step": self.step, "event": self.event, "displacement": self.displacement}
        data["cosine"] = self.cosine
        if self.sentinel is not None:
            data["sentinel"] = self.sentinel
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckRecord:
        return cls(data["step"], data["displacement"], data.get("cosine"), data.get("sentinel"))


@dataclasses.dataclass
class PointRecord:
    """One point a probe measured: its estimate (:class:`~safety_guard.guard.rule.PointEstimate`
    fields), capability NLL, the prompts scored, flagged (with their margins) and judged, the
    tokens and seconds it took."""

    asr: float
    rise: float
    se: float
    nll_rise: float | None
    nll: float | None
    scored: int
    flagged: int
    flagged_prompts: list[int]
    margins: list[float | None]
    confirmed_unsafe: list[int]
    confirmed_safe: list[int]
    tokens: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PointRecord:
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class ProbeRecord:
    """A probe: the decision (status, reasons, the horizon and the rise there) and each point
    θ₀ + s·δ it measured, keyed by the multiple s (1.0: the current model, when it was scored).
    ``asr`` and ``rise`` are the current model's (None when the lookahead bounded it)."""

    step: int
    displacement: float
    exact: bool
    estimate: str
    confirmed: int
    horizon: float
    horizon_rise: float
    horizon_lower: float
    covered: float
    status: str
    reasons: list[str]
    asr: float | None
    rise: float | None
    rise_bound: float
    points: dict[float, PointRecord]
    probe_seconds: float
    reason: str | None = None
    cosine: float | None = None
    sentinel: dict[str, Any] | None = None
    #: steps until the promise breaks at the run's pace (:mod:`~safety_guard.guard.forecast`)
    eta_steps: int | None = None
    #: the sketch of δ at the probe (:func:`~safety_guard.guard.displacement.encode_sketch`):
    #: where the run went, for its path over a landscape (:mod:`safety_guard.guard.path`)
    sketch: str | None = None
    event = "probe"

    @property
    def farthest(self) -> float:
        """The farthest multiple of δ measured (1.0: the current model only)."""
        return max(self.points)

    def estimates(self) -> dict[float, PointEstimate]:
        """Each measured point's estimate, per multiple of δ."""
        return {s: PointEstimate(p.asr, p.rise, p.se, p.nll_rise) for s, p in self.points.items()}

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"step": self.step, "event": self.event}
        for f in dataclasses.fields(self):
            if f.name not in ("step", "points", "sentinel"):
                data[f.name] = getattr(self, f.name)
        data["points"] = {f"{s:g}": p.to_json() for s, p in self.points.items()}
        if self.sentinel is not None:
            data["sentinel"] = self.sentinel
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProbeRecord:
        values = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        values["points"] = {float(k): PointRecord.from_json(p) for k, p in data["points"].items()}
        return cls(**values)


def record_from_json(data: Mapping[str, Any]) -> CheckRecord | ProbeRecord:
    """A trajectory line back as its record."""
    return (ProbeRecord if data.get("event") == "probe" else CheckRecord).from_json(data)


def probe_record(
    step: int,
    displacement: float,
    settled: Settled,
    decision: Decision,
    states: dict[float, StateMeasure],
    seconds: float,
) -> ProbeRecord:
    """A probe's record: the decision, and each point θ₀ + s·δ it measured."""
    points = {
        s: PointRecord(
            **settled.points[s].to_dict(),
            nll=st.nll,
            scored=st.scored,
            flagged=sum(st.flagged),
            flagged_prompts=[i for i, f in enumerate(st.flagged) if f],
            margins=[round(m, 3) if m == m else None for m in st.margins],
            confirmed_unsafe=sorted(i for i, v in st.confirmed.items() if v),
            confirmed_safe=sorted(i for i, v in st.confirmed.items() if not v),
            tokens=st.tokens,
            seconds=st.seconds,
        )
        for s, st in states.items()
    }
    current = points.get(1.0)  # None: not scored, the lookahead bounds it
    return ProbeRecord(
        step=step,
        displacement=displacement,
        exact=settled.exact,
        estimate="forward" if settled.forward else ("judged" if settled.exact else "sampled"),
        confirmed=settled.confirmed,
        horizon=decision.horizon,
        horizon_rise=decision.horizon_rise,
        horizon_lower=decision.horizon_lower,
        covered=decision.covered,
        status=STATUS_NAMES[decision.status],
        reasons=decision.reasons,
        asr=current.asr if current else None,
        rise=current.rise if current else None,
        rise_bound=points[min(states)].rise,
        points=points,
        probe_seconds=seconds,
    )


def probe_metrics(
    record: ProbeRecord, status: int, aligned_asr: float, lookahead: Sequence[float]
) -> dict[str, float]:
    """The ``safety/*`` metrics of a probe record (``status``: the decision's, 0 ok, 1 warn,
    2 halt)."""
    metrics = {
        "safety/asr_aligned": aligned_asr,
        "safety/horizon_rise": record.horizon_rise,
        "safety/status": float(status),
        "safety/probe_seconds": record.probe_seconds,
    }
    current = record.points.get(1.0)
    if current is not None:
        metrics["safety/asr"] = current.asr
        metrics["safety/asr_rise"] = current.rise
        if current.nll_rise is not None:
            metrics["safety/nll_rise"] = current.nll_rise
    for s in lookahead:
        if s in record.points:
            metrics[f"safety/lookahead_{s:g}x_rise"] = record.points[s].rise
    if record.eta_steps is not None:
        metrics["safety/eta_steps"] = float(record.eta_steps)
    return metrics


def sentinels_of(record: ProbeRecord, count: int) -> list[int]:
    """The ``count`` prompts a probe record found nearest to flipping at its farthest point
    (:func:`~safety_guard.guard.cadence.sentinel_prompts`)."""
    if not count:
        return []
    point = record.points[record.farthest]
    flagged = set(point.flagged_prompts)
    return sentinel_prompts(point.margins, [i in flagged for i in range(len(point.margins))], count)
