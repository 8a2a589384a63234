"""The guard's rule of an earlier commit beside today's, replayed on the same saved runs.

The decision rule is a pure function of a run's records (``guard_runs.replay``), so a rule that
is gone from the code can still be judged on recordings it never saw: this script checks the
commit ``--then`` out in a temporary git worktree, replays that commit's ``GuardConfig()`` with
that commit's ``guard_runs.replay`` on every ``result.json`` under ``--runs`` (in a subprocess,
so that each rule imports its own ``safety_guard``), replays today's the same way in this
process, and prints one table: each run's class (by the damage of the unguarded run), when its
held-out damage passed 20 points, and the halt step and lead of both rules; between them, today's
rule with the horizon counted in steps (the run's schedule withheld), which tells the schedule's
part of a difference from the rest.

The default ``--then`` is ea07e6e, the rule before the horizon counted the learning rate the
run's schedule has left (the largest lookahead, 2·δ, until the last steps, where the horizon
shrinks with the steps left at the pace the displacement grew) and before the cadence counted
the turn of δ off the probed line.

    python benchmarks/rule_then_now.py --runs benchmarks/results/guard_schedules

Output: the table, also written to ``benchmarks/results/rule_then_now.md`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import markdown_table
from guard_runs import classify, passes, replay

from safety_guard.guard import GuardConfig

ROOT = Path(__file__).resolve().parents[1]

#: runs in the child process, inside the worktree of the earlier commit
_CHILD = """
import glob, json, sys
root = sys.argv[1]
sys.path[:0] = [root + "/benchmarks", root]
import safety_guard
if not safety_guard.__file__.startswith(root):
    raise SystemExit(f"imported {safety_guard.__file__}, not the worktree's safety_guard")
from guard_runs import replay
from safety_guard.guard import GuardConfig
out = {}
for path in sorted(glob.glob(sys.argv[2] + "/*/result.json")):
    with open(path) as f:
        rep = replay(json.load(f), GuardConfig())
    out[path.split("/")[-2]] = rep["halt"]
print(json.dumps(out))
"""


def replay_at(commit: str, runs: Path) -> dict[str, int | None]:
    """``{run: halt step or None}``: ``GuardConfig()`` of ``commit`` replayed by that commit's
    ``guard_runs.replay`` on the runs under ``runs``."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "then"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), commit],
            check=True,
        )
        try:
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, str(tree), str(runs.resolve())],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise RuntimeError(
                    f"The replay of {commit}'s rule failed (exit {done.returncode}):\n"
                    + done.stderr[-3000:]
                )
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True
            )
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(runs: Path, then: str) -> list[dict[str, Any]]:
    """One row per saved run under ``runs``: its class, damage > 20, and both rules' halts."""
    earlier = replay_at(then, runs)
    config = GuardConfig()
    rows = []
    for path in sorted(runs.glob("*/result.json")):
        name = path.parent.name
        result = json.loads(path.read_text())
        cls, over20, _ = classify(result["curve"])
        old = earlier[name]
        in_steps = replay({k: v for k, v in result.items() if k != "schedule"}, config)["halt"]
        now = replay(result, config)["halt"]
        row: dict[str, Any] = {"run": name, "class": cls, "damage >20 at": over20 or "never"}
        for label, halt in ((then, old), ("today, horizon in steps", in_steps), ("today", now)):
            row[f"halt ({label})"] = halt if halt is not None else "no halt"
            if label != "today, horizon in steps":
                row[f"lead ({label})"] = (over20 - halt) if (halt is not None and over20) else "-"
                verdict = "PASS" if passes(cls, over20, halt) else "FAIL"
                row[f"goal ({label})"] = verdict + (" (gray)" if cls == "gray" else "")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, required=True, help="A guard_runs.py output folder.")
    parser.add_argument("--then", default="ea07e6e", help="The commit whose rule to replay.")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "rule_then_now.md",
    )
    args = parser.parse_args()
    if not any(args.runs.glob("*/result.json")):
        parser.error(f"no saved runs (*/result.json) under {args.runs}")
    known = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--quiet", "--verify", f"{args.then}^{{commit}}"],
        capture_output=True,
    )
    if known.returncode:
        parser.error(f"{args.then!r} is not a commit of this repository ({ROOT})")
    text = markdown_table(table(args.runs, args.then)) + "\n"
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
