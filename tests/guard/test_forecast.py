"""The safety ETA: where the promise breaks on the finetune's line, and when the run gets there."""

from __future__ import annotations

import math

import pytest

from safety_guard.guard import GuardConfig, LrSchedule, crossing_multiple, eta_steps, pace
from safety_guard.guard.cadence import ProbeMemo, probe_due
from safety_guard.guard.forecast import agree, deferred, forecast
from safety_guard.guard.records import ProbeRecord, probe_metrics
from safety_guard.guard.rule import HALT, WARN, PointEstimate, decide

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
    eta = eta_steps(record.estimates(), CFG, 40, 0.02, growth=0.0, max_steps=200)
    forecast(record, decision, eta)
    assert record.eta_steps == eta == math.ceil((2 + 6 / 11 - 1) * 40)
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
    forecast(calm, ok, eta_steps(calm.estimates(), CFG, 40, 0.02, max_steps=200))
    assert calm.eta_steps is None and "safety/eta_steps" not in probe_metrics(calm, 0, 5.0, (2.0,))
    assert not any("at this pace" in r for r in ok.reasons)
    assert ProbeRecord.from_json(record.to_json()).eta_steps == record.eta_steps


def test_halt_within_defers_a_halt_on_the_line_ahead_and_probes_at_its_deadline():
    within = GuardConfig(halt_within=10)
    points = {1.0: NOW, 2.0: AHEAD}  # the bound crosses at 1.5·δ; 2 now, 18 at 2·δ
    halt = decide(points, 2.0, within)
    assert halt.status == HALT
    # 0.02 after 40 steps: the break is 20 steps away, more than 10: a warning with a deadline
    eta = eta_steps(points, within, 40, 0.02, max_steps=200)
    warn = deferred(halt, points, 40, eta, within)
    assert (warn.status, warn.deadline) == (WARN, 50)
    assert "breaks in about 20 steps (> halt_within 10)" in warn.reasons[-1]
    assert "a probe at step 50 halts" in warn.reasons[-1]
    # the record does not say the ETA twice
    record = _record(points)
    forecast(record, warn, eta)
    assert record.eta_steps == 20 and sum("about 20 steps" in r for r in warn.reasons) == 1
    # the cadence probes at the deadline, not before (nothing else due)
    memo = ProbeMemo(40, 0.02, 0.03, deadline=warn.deadline)
    due = [s for s in range(41, 60) if probe_due(s, 0.02, 0.0, 1.0, memo, within)]
    assert due[0] == 50 and "deferred its halt to step 50" in probe_due(
        50, 0.02, 0.0, 1.0, memo, within
    )
    # within halt_within steps, or by default: the halt stands
    assert deferred(halt, points, 40, 10, within) is halt
    assert deferred(halt, points, 40, eta, CFG) is halt
    # a break beyond the run's end is deferred too (never sooner than a nearer one), with no
    # deadline: the cadence probes before the model reaches the covered distance
    beyond = deferred(halt, points, 40, None, within, beyond_end=True)
    assert beyond.status == WARN and beyond.deadline is None
    assert "beyond the run's end" in beyond.reasons[-1]
    # no ETA because there is no pace to project from: nothing says the break is far
    assert deferred(halt, points, 40, None, within) is halt
    # the probe a deferral scheduled decides: no second deferral, and a deadline never moves
    # later (a decaying learning rate pushes the ETA out)
    assert deferred(halt, points, 50, 30, within, previous_deadline=50) is halt
    assert deferred(halt, points, 45, 30, within, previous_deadline=50).deadline == 50
    # the deadline falls on a step the guard checks
    sparse = GuardConfig(halt_within=10, check_every=4)
    assert deferred(halt, points, 40, 23, sparse).deadline == 52  # 53, down to a check step
    assert deferred(halt, points, 40, 13, sparse) is halt  # 43 → 40: the decision is now
    # the current model past the promise (its bound, or its estimate), broken or collapsed:
    # never deferred
    for now in (
        PointEstimate(25.0, 20.0, 2.0),
        PointEstimate(16.0, 11.0, 3.0),
        PointEstimate(math.nan, math.nan, math.nan),
        PointEstimate(8.0, 3.0, 1.0, nll_rise=2.0),
    ):
        bad = {1.0: now, 2.0: AHEAD}
        decision = decide(bad, 2.0, within)
        assert deferred(decision, bad, 40, 50, within) is decision
    # an ok or warn decision is left as it is
    calm = {1.0: NOW, 2.0: PointEstimate(9.0, 4.0, 1.0)}
    assert deferred(decide(calm, 2.0, within), calm, 40, None, within).status == 0


def test_every_rank_takes_the_most_severe_decision_and_the_earliest_deadline(monkeypatch):
    import safety_guard.guard.forecast as forecast_module

    points = {1.0: NOW, 2.0: AHEAD}
    within = GuardConfig(halt_within=10)
    warn = deferred(decide(points, 2.0, within), points, 40, 20, within)
    assert agree(warn) is warn  # one process: nothing to reduce
    # another rank halted: everyone halts, with no deadline
    monkeypatch.setattr(forecast_module, "all_reduce_max", lambda v: [2.0, v[1]])
    halted = agree(warn)
    assert (halted.status, halted.deadline) == (HALT, None)
    assert halted.reasons[-1] == "another rank decided so"
    # another rank's deadline is earlier: everyone probes then
    monkeypatch.setattr(forecast_module, "all_reduce_max", lambda v: [v[0], -45.0])
    assert agree(warn).deadline == 45 and agree(warn).status == WARN
    with pytest.raises(ValueError, match="halt_within"):
        GuardConfig(halt_within=-1)


def test_memos_and_records_keep_the_deadline_and_the_sketch_through_json():
    import json

    from safety_guard.guard.state import GuardState

    memo = ProbeMemo(40, 0.02, 0.03, deadline=50)
    state = GuardState()
    state.memo = memo
    back = GuardState.from_dict(json.loads(json.dumps(state.to_dict(None))))
    assert back.memo == memo and back.memo.deadline == 50
    record = _record({1.0: NOW, 2.0: AHEAD})
    record.sketch = "AACAPw=="  # float32 1.0
    again = ProbeRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again.sketch == record.sketch and again == record
