"""The guard's records: what one probe measured and decided, as the trajectory file keeps it,
and the ``safety/*`` metrics it reports.

Example:
    >>> farthest({"points": {"1": {}, "2": {}}})
    2.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from safety_guard.guard.cadence import sentinel_prompts
from safety_guard.guard.confirmation import Settled
from safety_guard.guard.probing import StateMeasure
from safety_guard.guard.rule import STATUS_NAMES, Decision

__all__ = ["farthest", "probe_metrics", "probe_record", "sentinels_of"]


def farthest(record: dict[str, Any]) -> float:
    """The farthest multiple of δ a probe record measured (1.0: the current model only)."""
    return max(float(k) for k in record["points"])


def probe_record(
    step: int,
    displacement: float,
    settled: Settled,
    decision: Decision,
    states: dict[float, StateMeasure],
    seconds: float,
) -> dict[str, Any]:
    """A probe's trajectory record: the decision, and each point θ₀ + s·δ it measured (keyed
    ``f"{s:g}"``: ``"1"`` is the current model) with its estimate, flagged and confirmed prompts,
    margins, tokens and seconds."""
    points = {}
    for s, st in states.items():
        points[f"{s:g}"] = {
            **settled.points[s].to_dict(),
            "nll": st.nll,
            "scored": st.scored,
            "flagged": sum(st.flagged),
            "flagged_prompts": [i for i, f in enumerate(st.flagged) if f],
            "margins": [round(m, 3) if m == m else None for m in st.margins],
            "confirmed_unsafe": sorted(i for i, v in st.confirmed.items() if v),
            "confirmed_safe": sorted(i for i, v in st.confirmed.items() if not v),
            "tokens": st.tokens,
            "seconds": st.seconds,
        }
    current = points.get("1")  # None: not scored, the lookahead bounds it
    nearest = points[f"{min(states):g}"]
    return {
        "step": step,
        "event": "probe",
        "displacement": displacement,
        "exact": settled.exact,
        "estimate": "forward" if settled.forward else ("judged" if settled.exact else "sampled"),
        "confirmed": settled.confirmed,
        "horizon": decision.horizon,
        "horizon_rise": decision.horizon_rise,
        "horizon_lower": decision.horizon_lower,
        "covered": decision.covered,
        "status": STATUS_NAMES[decision.status],
        "reasons": decision.reasons,
        "asr": current["asr"] if current else None,
        "rise": current["rise"] if current else None,
        "rise_bound": nearest["rise"],
        "points": points,
        "probe_seconds": seconds,
    }


def probe_metrics(
    record: dict[str, Any], status: int, aligned_asr: float, lookahead: Sequence[float]
) -> dict[str, float]:
    """The ``safety/*`` metrics of a probe record (``status``: the decision's, 0 ok, 1 warn,
    2 halt)."""
    points = record["points"]
    metrics = {
        "safety/asr_aligned": aligned_asr,
        "safety/horizon_rise": record["horizon_rise"],
        "safety/status": float(status),
        "safety/probe_seconds": record["probe_seconds"],
    }
    current = points.get("1")
    if current is not None:
        metrics["safety/asr"] = current["asr"]
        metrics["safety/asr_rise"] = current["rise"]
        if current["nll_rise"] is not None:
            metrics["safety/nll_rise"] = current["nll_rise"]
    for s in lookahead:
        if f"{s:g}" in points:
            metrics[f"safety/lookahead_{s:g}x_rise"] = points[f"{s:g}"]["rise"]
    return metrics


def sentinels_of(record: dict[str, Any], count: int) -> list[int]:
    """The ``count`` prompts a probe record found nearest to flipping at its farthest point
    (:func:`~safety_guard.guard.cadence.sentinel_prompts`)."""
    if not count:
        return []
    point = record["points"][f"{farthest(record):g}"]
    flagged = set(point["flagged_prompts"])
    margins = point["margins"]
    return sentinel_prompts(margins, [i in flagged for i in range(len(margins))], count)
