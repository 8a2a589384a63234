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
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["append_record", "read_records", "truncate_after"]

logger = logging.getLogger(__name__)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record (a JSON line); creates the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The file's records; a line that is not a JSON object is skipped with a warning naming it."""
    if not path.exists():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            logger.warning("SafetyGuard: skipping %s line %d, not JSON (%s).", path, lineno, err)
            continue
        if not isinstance(record, dict) or "step" not in record:
            logger.warning("SafetyGuard: skipping %s line %d, not a guard record.", path, lineno)
            continue
        records.append(record)
    return records


def truncate_after(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the records up to ``step`` (rewriting the file atomically) and return them."""
    records = read_records(path)
    kept = [r for r in records if r["step"] <= step]
    if path.exists() and len(kept) != len(records):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info(
            "SafetyGuard: resumed at step %d; dropped %d trajectory records written after it.",
            step,
            len(records) - len(kept),
        )
    return kept
