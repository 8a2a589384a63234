"""The guard's trajectory file: one JSON record per check or probe, appended as training goes.

Only the main process writes it. On resume from a checkpoint the records written after the
checkpoint's step are dropped (they belong to the run that crashed), so the file of a resumed run
equals that of a run that never stopped.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "trajectory.jsonl"
    >>> append_record(path, {"step": 1, "event": "check"})
    >>> append_record(path, {"step": 2, "event": "check"})
    >>> [r["step"] for r in truncate_after(path, 1)]
    [1]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safety_guard.files import atomic_write_text

__all__ = ["append_record", "read_records", "truncate_after"]

logger = logging.getLogger(__name__)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record (a JSON line); creates the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _parse(path: Path) -> tuple[list[dict[str, Any]], list[int], bool]:
    """The file's whole records, the numbers of the lines that are not (half-written, NUL
    bytes, not UTF-8, not a guard record), and whether the file needs rewriting to hold only
    whole records (a damaged line, or a last line without its newline)."""
    if not path.exists():
        return [], [], False
    data = path.read_bytes()
    records, damaged = [], []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            damaged.append(lineno)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            damaged.append(lineno)
            continue
        records.append(record)
    return records, damaged, bool(damaged) or (bool(data) and not data.endswith(b"\n"))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The file's records; lines that are not whole guard records are skipped with a warning
    naming the file and the lines."""
    records, damaged, _ = _parse(path)
    if damaged:
        logger.warning(
            "SafetyGuard: skipping %d damaged line(s) of %s (line %s): not whole guard records.",
            len(damaged),
            path,
            ", ".join(map(str, damaged[:5])),
        )
    return records


def truncate_after(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the whole records up to ``step`` and return them; the file is rewritten atomically
    when records are dropped or lines are damaged (a record half-written by a crash), so the
    next record is appended after the last whole one."""
    records, damaged, rewrite = _parse(path)
    kept = [r for r in records if r["step"] <= step]
    if not (rewrite or len(kept) != len(records)):
        return kept
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    if damaged:
        logger.warning(
            "SafetyGuard: %s had %d damaged line(s) (line %s: a record half-written when the "
            "run stopped?); cut back to its %d whole records.",
            path,
            len(damaged),
            ", ".join(map(str, damaged[:5])),
            len(kept),
        )
    if len(kept) != len(records):
        logger.info(
            "SafetyGuard: resumed at step %d; dropped %d trajectory records written after it.",
            step,
            len(records) - len(kept),
        )
    return kept
