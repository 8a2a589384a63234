"""What a guard has seen and done so far: :class:`GuardState`, saved with every checkpoint.

A resumed run takes it back, so its counters, cadence and decisions equal an uninterrupted
run's. The trajectory itself lives in the guard's ``trajectory.jsonl``
(:mod:`~safety_guard.guard.trajectory`), not in the checkpoint.

Example:
    >>> state = GuardState(warn_count=2, halt_step=40, halt_reason="ASR rise")
    >>> GuardState.from_dict(state.to_dict()).halt_step
    40
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from safety_guard.guard.cadence import ProbeMemo
from safety_guard.guard.records import CheckRecord, ProbeRecord

__all__ = ["STATE_VERSION", "GuardState"]

#: The version of :meth:`GuardState.to_dict`'s layout.
STATE_VERSION = 1


@dataclasses.dataclass
class GuardState:
    """The guard's counters, decisions and timings.

    Attributes:
        records: the trajectory, one record per check or probe (not saved in checkpoints).
        last_safe_step: the last step a probe found within the promise.
        warn_count: warn decisions so far.
        halt_step, halt_reason: the halt, when the guard halted the run.
        restored_step: the step whose LoRA adapter the halt put back (``restore_on_halt``).
        would_halt_step, would_halt_reason, would_halt_count: monitor mode (``halt=False``):
            the first halt decision, and how many there were.
        memo: what the last probe left for the cadence (:class:`ProbeMemo`).
        history: (step, displacement) of the recent checks.
        probe_seconds, check_seconds, sentinel_seconds: the time of each probe, check and
            sentinel check.
        setup_seconds: the time ``begin`` took.
        total_seconds: all of the guard's time (begin, steps, end).
    """

    records: list[CheckRecord | ProbeRecord] = dataclasses.field(default_factory=list)
    last_safe_step: int | None = None
    warn_count: int = 0
    halt_step: int | None = None
    halt_reason: str | None = None
    restored_step: int | None = None
    would_halt_step: int | None = None
    would_halt_reason: str | None = None
    would_halt_count: int = 0
    memo: ProbeMemo | None = None
    history: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    probe_seconds: list[float] = dataclasses.field(default_factory=list)
    check_seconds: list[float] = dataclasses.field(default_factory=list)
    sentinel_seconds: list[float] = dataclasses.field(default_factory=list)
    setup_seconds: float = 0.0
    total_seconds: float = 0.0

    def to_dict(self, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
        """The state as JSON-ready values, with the aligned model's ``baseline``."""
        return {
            "version": STATE_VERSION,
            "last_safe_step": self.last_safe_step,
            "warn_count": self.warn_count,
            "halt_step": self.halt_step,
            "halt_reason": self.halt_reason,
            "restored_step": self.restored_step,
            "would_halt_step": self.would_halt_step,
            "would_halt_reason": self.would_halt_reason,
            "would_halt_count": self.would_halt_count,
            "memo": self.memo.to_dict() if self.memo else None,
            "history": self.history[-8:],
            "probe_seconds": self.probe_seconds,
            "check_seconds": self.check_seconds,
            "sentinel_seconds": self.sentinel_seconds,
            "total_seconds": self.total_seconds,
            "baseline": baseline,
            "step": self.records[-1].step if self.records else 0,
        }

    @classmethod
    def check_version(cls, data: Mapping[str, Any]) -> None:
        """Refuse a state another layout wrote, saying what to do."""
        if data.get("version") != STATE_VERSION:
            raise ValueError(
                f"The checkpoint's guard state has version {data.get('version')}, this "
                f"safety-guard reads version {STATE_VERSION}; resume with the version that "
                "wrote it."
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuardState:
        """Rebuild from :meth:`to_dict` (records empty: they come from the trajectory file)."""
        cls.check_version(data)
        return cls(
            last_safe_step=data["last_safe_step"],
            warn_count=data["warn_count"],
            halt_step=data["halt_step"],
            halt_reason=data.get("halt_reason"),
            restored_step=data.get("restored_step"),
            would_halt_step=data.get("would_halt_step"),
            would_halt_reason=data.get("would_halt_reason"),
            would_halt_count=int(data.get("would_halt_count", 0)),
            memo=ProbeMemo.from_dict(data["memo"]) if data.get("memo") else None,
            history=[(int(s), float(d)) for s, d in data.get("history", [])],
            probe_seconds=list(data.get("probe_seconds", [])),
            check_seconds=list(data.get("check_seconds", [])),
            sentinel_seconds=list(data.get("sentinel_seconds", [])),
            total_seconds=float(data.get("total_seconds", 0.0)),
        )

    def summary(self) -> dict[str, Any]:
        """The state's part of the guard's summary: decisions, counts, timings."""
        probes = [r for r in self.records if isinstance(r, ProbeRecord)]

        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        return {
            "halt_step": self.halt_step,
            "halt_reason": self.halt_reason,
            "restored_step": self.restored_step,
            "would_halt_step": self.would_halt_step,
            "would_halt_reason": self.would_halt_reason,
            "would_halt_count": self.would_halt_count,
            "last_safe_step": self.last_safe_step,
            "warn_count": self.warn_count,
            "probes": len(probes),
            "checks": len(self.check_seconds),
            "max_rise": max(
                (r.rise for r in probes if r.rise is not None and r.rise == r.rise), default=None
            ),
            # the last probe as the trajectory has it, less its sketch of δ (kept there)
            "final": {k: v for k, v in probes[-1].to_json().items() if k != "sketch"}
            if probes
            else None,
            "mean_probe_seconds": mean(self.probe_seconds),
            "total_probe_seconds": sum(self.probe_seconds),
            "setup_seconds": self.setup_seconds,
            "sentinels": len(self.sentinel_seconds),
            "total_sentinel_seconds": sum(self.sentinel_seconds),
            "total_seconds": self.total_seconds,
            "mean_check_seconds": mean(self.check_seconds),
        }
