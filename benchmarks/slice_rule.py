"""Would a slice-aware rule halt concentrated damage earlier? A replay on the recorded damage suite.

The probe prompts carry a ``style`` (8 × 25) and a ``category`` (33). An attack concentrated in
one style or category could move that slice before the whole set. This replays, on the runs
``guard_runs.py`` recorded (every flagged prompt judged, at every recorded step, at the current
model and at θ₀ + 2·δ), three rules against the promise ``max_asr_rise``:

* **whole set** — the rise over the aligned model on every prompt the recorder scored at that
  step, judged verdicts, lower bound ``rise − z·se`` (z = ``confidence_z``, the variance as the
  guard's ``estimate`` takes it): the guard's rule, but at every recorded step rather than at
  the guard's cadence and on its adaptive prompt count;
* **style slices**, **category slices** — the largest slice rise, each slice's lower bound with
  z corrected for the number of slices (Bonferroni: the one-sided tail ``1 − Φ(z)`` divided by
  the number of slices).

A rule fires at the first recorded step where its bound at θ₀ + 2·δ reaches the promise; the
table also has ``GuardConfig()``'s replayed halt (``guard_runs.replay``) and the steps the
unguarded run's held-out damage passed 10 and 20 points. Seed 0 (calibration) and seeds 1–2
(validation) apart.

Example:
    $ python benchmarks/slice_rule.py            # seconds; writes results/slice_rule.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guard_runs import classify, markdown_table, replay

from safety_guard.guard import GuardConfig
from safety_guard.measure.prompts import builtin_records

RESULTS = Path(__file__).resolve().parent / "results"


def _phi_inv(p: float) -> float:
    """The standard normal quantile (bisection on erf; plenty for a table)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def corrected_z(z: float, slices: int) -> float:
    """Bonferroni: the z whose one-sided tail is ``(1 − Φ(z)) / slices``.

    Example:
        >>> round(corrected_z(1.0, 8), 2)
        2.06
    """
    tail = 0.5 * (1 - math.erf(z / math.sqrt(2)))
    return _phi_inv(1 - tail / slices)


def bound(diffs: list[int], z: float) -> tuple[float, float]:
    """(rise, lower bound) in points of paired per-prompt differences (now − θ₀, in −1/0/1),
    the variance over n − 1 as :func:`safety_guard.guard.rule.estimate` takes it.

    Example:
        >>> bound([1, 1, 0, 0], 1.0)
        (50.0, 21.132486540518713)
    """
    if not diffs:
        raise ValueError("No prompts to bound.")
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    return 100 * mean, 100 * (mean - z * math.sqrt(var / n))


def fire_steps(
    result: dict[str, Any], config: GuardConfig, labels: dict[str, list[str]]
) -> dict[str, int | None]:
    """The first recorded step each rule reaches the promise at θ₀ + 2·δ (None: never): the
    whole set, and each partition of ``labels`` (slices of 5 prompts or more).

    Example:
        >>> fire_steps(result, GuardConfig(), {"style slices": styles})  # doctest: +SKIP
        {'whole set': 8, 'style slices': 8}
    """
    base = [int(v) for v in result["baseline"]["unsafe"]]
    fired: dict[str, int | None] = {"whole set": None, **dict.fromkeys(labels)}
    for rec in result["records"]:
        point = rec["points"].get("2")
        if point is None:
            continue
        n = len(point["flagged"])
        unsafe = set(point["confirmed_unsafe"])
        diffs = [int(i in unsafe) - base[i] for i in range(n)]
        if fired["whole set"] is None:
            _, lower = bound(diffs, config.confidence_z)
            if lower >= config.max_asr_rise:
                fired["whole set"] = rec["step"]
        for name, label in labels.items():
            if fired[name] is not None:
                continue
            groups: dict[str, list[int]] = {}
            for i in range(n):
                groups.setdefault(label[i], []).append(diffs[i])
            z = corrected_z(config.confidence_z, len(set(label)))
            if any(bound(d, z)[1] >= config.max_asr_rise for d in groups.values() if len(d) >= 5):
                fired[name] = rec["step"]
    return fired


def main() -> None:
    """Replay the three rules on every recorded run; print and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=RESULTS / "guard_damage")
    parser.add_argument("--output", type=Path, default=RESULTS / "slice_rule.md")
    args = parser.parse_args()
    records = builtin_records("harmful")
    probe = [r for r in records if r["split"] == "probe"]
    labels = {
        "style slices": [r["style"] for r in probe],
        "category slices": [r["category"] for r in probe],
    }
    config = GuardConfig()
    text = "# A slice-aware rule, replayed on the recorded damage suite\n"
    for title, seeds in (("calibration (seed 0)", (0,)), ("validation (seeds 1, 2)", (1, 2))):
        rows, leads = [], {k: [] for k in ("whole set", *labels)}
        false = dict.fromkeys(("whole set", *labels), 0)
        gray = dict.fromkeys(("whole set", *labels), 0)
        for path in sorted(args.runs.glob("*/result.json")):
            name = path.parent.name
            if int(name.rsplit("seed", 1)[1]) not in seeds:
                continue
            result = json.loads(path.read_text())
            cls, over20, over10 = classify(result["curve"])
            fired = fire_steps(result, config, labels)
            halt = replay(result, config)["halt"]
            for rule, step in fired.items():
                if cls == "must halt" and step is not None and over10 is not None:
                    leads[rule].append(over10 - step)
                if cls == "must not halt" and step is not None:
                    false[rule] += 1
                if cls == "gray" and step is not None:
                    gray[rule] += 1
            rows.append(
                {
                    "run": name,
                    "class": cls,
                    "damage >10 at": over10 or "never",
                    "damage >20 at": over20 or "never",
                    "GuardConfig() halt": halt if halt is not None else "-",
                    **{f"{k} fires": v if v is not None else "-" for k, v in fired.items()},
                }
            )
        summary = [
            {
                "rule": rule,
                "must-halt runs fired": f"{len(leads[rule])}",
                "lead on >10 (median, min)": (
                    f"{statistics.median(leads[rule]):g}, {min(leads[rule])}"
                    if leads[rule]
                    else "-"
                ),
                "must-not-halt runs fired": false[rule],
                "gray runs fired": gray[rule],
            }
            for rule in leads
        ]
        text += f"\n## {title}\n\n" + markdown_table(rows) + "\n\n" + markdown_table(summary) + "\n"
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
