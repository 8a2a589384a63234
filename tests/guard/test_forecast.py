"""The safety ETA: where the promise breaks on the finetune's line, and when the run gets there."""

from __future__ import annotations

import math

import pytest

from safety_guard.guard import GuardConfig, LrSchedule, crossing_multiple, eta_steps, pace
from safety_guard.guard.forecast import forecast
from safety_guard.guard.records import ProbeRecord, probe_metrics
from safety_guard.guard.rule import WARN, PointEstimate, decide

CFG = GuardConfig()  # max_asr_rise 10, confidence_z 1
NOW = PointEstimate(asr=8.0, rise=3.0, se=1.0)  # lower bound 2
AHEAD = PointEstimate(asr=25.0, rise=20.0, se=2.0)  # lower bound 18


def test_the_crossing_is_where_the_lower_bound_reaches_the_promise():
    assert crossing_multiple({1.0: NOW, 2.0: AHEAD}, CFG) == pytest.approx(1.5)
    # a larger z moves the bound down, the crossing out
    z2 = GuardConfig(confidence_z=2.0)  # bounds 1 and 16
    assert crossing_multiple({1.0: NOW, 2.0: AHEAD}, z2) == pytest.approx(1 + 9 / 15)
    # past the promise now: 1; nothing measured past it: no crossing (no extrapolation)
    assert crossing_multiple({1.0: PointEstimate(20.0, 15.0, 2.0), 2.0: AHEAD}, CFG) == 1.0
    assert crossing_multiple({1.0: NOW, 2.0: PointEstimate(12.0, 9.0, 1.0)}, CFG) is None
    # between the second and the third measured multiple
    far = {1.0: NOW, 2.0: PointEstimate(10.0, 6.0, 1.0), 4.0: AHEAD}
    assert crossing_multiple(far, CFG) == pytest.approx(2 + 2 * (10 - 5) / (18 - 5))
    broken = {1.0: NOW, 2.0: PointEstimate(math.nan, math.nan, math.nan)}
    assert crossing_multiple(broken, CFG) is None


def test_the_eta_counts_steps_at_the_runs_pace():
    points = {1.0: NOW, 2.0: AHEAD}  # crossing at 1.5·δ: the displacement must grow by half
    # 0.02 after 40 steps: 0.0005 per step, 0.01 to go: 20 steps
    assert pace(40, 0.02) == pytest.approx(1 / 40)
    assert eta_steps(points, CFG, 40, 0.02) == 20
    # a recent growth faster than the average sets the pace: 0.001 per step, 10 steps
    assert eta_steps(points, CFG, 40, 0.02, growth=0.001) == 10
    # past the promise now: 0; the run ends first, or nothing to project from: none
    assert eta_steps({1.0: PointEstimate(20.0, 15.0, 2.0)}, CFG, 40, 0.02) == 0
    assert eta_steps(points, CFG, 40, 0.02, max_steps=50) is None
    assert eta_steps(points, CFG, 0, 0.0) is None


def test_a_decaying_learning_rate_puts_the_break_later():
    points = {1.0: NOW, 2.0: AHEAD}
    linear = LrSchedule([1 - k / 200 for k in range(200)])
    constant = eta_steps(points, CFG, 40, 0.02, schedule=LrSchedule.constant(200))
    decayed = eta_steps(points, CFG, 40, 0.02, schedule=linear)
    assert constant == 20 and decayed > constant
    # it takes the learning rate of those steps: half of what the first 40 spent
    assert linear.left(40, decayed) >= 0.5 * linear.spent(40) > linear.left(40, decayed - 1)
    # late in a decayed run the remaining learning rate cannot get there
    assert eta_steps(points, CFG, 180, 0.02, schedule=linear) is None


def test_steps_to_spend_walks_the_schedule():
    schedule = LrSchedule([1.0, 1.0, 0.5, 0.5])
    assert schedule.steps_to_spend(0, 2.0) == 2
    assert schedule.steps_to_spend(1, 1.5) == 2
    assert schedule.steps_to_spend(1, 0.0) == 0
    assert schedule.steps_to_spend(2, 1.5) is None  # only 1.0 is left
    assert schedule.left(1, 2) == 1.5 and schedule.left(1) == 2.0


def _record(points: dict[float, PointEstimate], step: int = 40) -> ProbeRecord:
    return ProbeRecord.from_json(
        {
            "step": step,
            "displacement": 0.02,
            "reasons": [],
            "points": {f"{s:g}": vars(p) for s, p in points.items()},
        }
    )


def test_a_warning_says_when_the_promise_breaks_and_the_metric_logs_it():
    # within the promise at the horizon (2·δ, lower bound 7), past it at 4·δ (lower bound 18):
    # a warning, and the bound crosses 10 at 2 + 2·3/11
    points = {
        1.0: NOW,
        2.0: PointEstimate(13.0, 8.0, 1.0),
        4.0: PointEstimate(25.0, 20.0, 2.0),
    }
    record = _record(points)
    decision = decide(record.estimates(), 2.0, CFG)
    assert decision.status == WARN
    forecast(record, decision, CFG, growth=0.0, max_steps=200)
    assert record.eta_steps == math.ceil((2 + 6 / 11 - 1) * 40)
    assert decision.reasons[-1] == (
        f"at this pace the promise breaks in about {record.eta_steps} steps"
    )
    assert type(record.eta_steps) is int
    assert [r for r in record.to_json()["reasons"] if "at this pace" in r] == [
        decision.reasons[-1]
    ]  # the trajectory line says it once
    metrics = probe_metrics(record, WARN, 5.0, (2.0,))
    assert metrics["safety/eta_steps"] == record.eta_steps
    # no break in sight: no metric, no sentence
    calm = _record({1.0: NOW, 2.0: PointEstimate(9.0, 4.0, 1.0)})
    ok = decide(calm.estimates(), 2.0, CFG)
    forecast(calm, ok, CFG, max_steps=200)
    assert calm.eta_steps is None and "safety/eta_steps" not in probe_metrics(calm, 0, 5.0, (2.0,))
    assert not any("at this pace" in r for r in ok.reasons)
    assert ProbeRecord.from_json(record.to_json()).eta_steps == record.eta_steps
