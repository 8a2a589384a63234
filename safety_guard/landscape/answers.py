"""The answers a file recorded, with their requests: for comparing judges on them
(:func:`~safety_guard.measure.agreement.judge_agreement`, ``safety-guard judge-agreement``).

* a landscape file: the answers of each point measured with ``record_answers`` (CLI
  ``--record-answers``), and the guard's baseline answers of the aligned model it holds;
* a ``.jsonl`` file: one ``{"prompt": ..., "response": ...}`` (or ``"answer"``) per line.

Example:
    >>> recorded_answers("landscape.json")[0].where  # doctest: +SKIP
    'origin'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safety_guard.landscape.file import Landscape
from safety_guard.measure.prompts import load_prompts

__all__ = ["RecordedAnswer", "recorded_answers"]


@dataclass(frozen=True)
class RecordedAnswer:
    """One recorded answer: where it was recorded, the request and the answer."""

    where: str
    prompt: str
    answer: str


def _prompts_of(
    source: str, limit: int | None, column: str | None, stored: dict[str, Any]
) -> list[str]:
    """The prompt texts a file's indices refer to, checked against the file's digest."""
    prompts = load_prompts(source, column=column, limit=limit)
    if stored.get("sha256") and prompts.sha256 != stored["sha256"]:
        raise ValueError(
            f"The prompts of {source!r} are not the ones this file was measured on (their "
            "digest differs): the answers cannot be paired with their requests."
        )
    return list(prompts)


def recorded_answers(path: str | Path) -> list[RecordedAnswer]:
    """Every (prompt, answer) a file recorded.

    * a landscape file: the answers of each point measured with ``record_answers``, and the
      guard's baseline answers of the aligned model (``guard_baseline``);
    * a ``.jsonl`` file: one ``{"prompt": ..., "response": ...}`` (or ``"answer"``) per line.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file records no answers, or its prompts cannot be found again.

    Example:
        >>> recorded_answers("landscape.json")[0].where  # doctest: +SKIP
        'direction 0, alpha +0.1'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No file at {path}.")
    if path.suffix == ".jsonl":
        return _jsonl_answers(path)
    data = Landscape.load(path).data
    out: list[RecordedAnswer] = []
    probe = data.get("probe") or {}
    config = probe.get("config") or {}
    origin = data.get("origin") or {}
    points = [("origin", origin)] if origin.get("answers") else []
    points += [
        (f"direction {d}, alpha {p['alpha']:+g}", p)
        for d, entry in enumerate(data["directions"])
        for p in entry["points"]
        if p.get("answers")
    ]
    points += [
        (f"surface, alpha {p['alpha']:+g} beta {p['beta']:+g}", p)
        for p in (data.get("surface") or {}).get("points", [])
        if p.get("answers")
    ]
    if points:
        texts = _prompts_of(
            config.get("harmful", "builtin:harmful"),
            config.get("num_harmful"),
            config.get("prompt_column"),
            probe.get("harmful") or {},
        )
        for where, p in points:
            out += [RecordedAnswer(where, q, a) for q, a in zip(texts, p["answers"], strict=True)]
    baseline = data.get("guard_baseline")
    if baseline and baseline.get("responses"):
        stored = (baseline.get("settings") or {}).get("harmful") or {}
        responses = baseline["responses"]
        texts = _prompts_of(
            stored.get("name", "builtin:harmful:probe"), stored.get("count"), None, stored
        )
        texts = texts[: len(responses)]
        out += [
            RecordedAnswer("guard baseline (aligned model)", q, a)
            for q, a in zip(texts, responses, strict=True)
        ]
    if not out:
        raise ValueError(
            f"{path} records no answers: compute the landscape with --record-answers "
            "(ProbeConfig(record_answers=True)), or pass a JSONL file of prompt/response pairs."
        )
    return out


def _jsonl_answers(path: Path) -> list[RecordedAnswer]:
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not JSON: {err}") from None
        answer = record.get("response", record.get("answer")) if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{number} has no 'prompt' string.")
        if not isinstance(answer, str):
            raise ValueError(f"{path}:{number} has no 'response' (or 'answer') string.")
        out.append(RecordedAnswer(f"{path.name}:{number}", record["prompt"], answer))
    if not out:
        raise ValueError(f"{path} holds no records.")
    return out
