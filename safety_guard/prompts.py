"""Prompt sets: the built-in harmful and benign requests, and loaders for CSV, JSONL and datasets.

The built-in sets were written for this project (requests only, never harmful content) and are
split so that no prompt is used for two jobs: ``align`` prompts only align the testbed model,
``attack`` / ``finetune`` prompts only serve as finetuning data, ``heldout`` prompts only measure.
``builtin:harmful`` and ``builtin:benign`` default to the held-out split.

Example:
    >>> harmful = load_prompts("builtin:harmful")
    >>> len(harmful) >= 100, harmful.name
    (True, 'builtin:harmful:heldout')
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["PromptSet", "builtin_records", "load_prompts", "load_text_lines"]

_COLUMN_CANDIDATES = ("goal", "prompt", "instruction", "question", "text", "query")
_BUILTIN_DEFAULT_SPLIT = {"harmful": "heldout", "benign": "heldout"}
_BUILTIN_FILES = {"harmful": ("harmful.jsonl", "harmful_probe.jsonl"), "benign": ("benign.jsonl",)}


@dataclass(frozen=True)
class PromptSet:
    """An ordered, immutable list of prompts with a name and a content hash."""

    name: str
    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(
                f"Prompt set {self.name!r} is empty. Point it at a file with at least one "
                "non-empty prompt, or use 'builtin:harmful' / 'builtin:benign'."
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]

    @property
    def sha256(self) -> str:
        """Hash of the prompts' text and order, stored in landscape files."""
        digest = hashlib.sha256()
        for prompt in self.prompts:
            digest.update(prompt.encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def head(self, n: int | None) -> PromptSet:
        """The first ``n`` prompts (all when ``n`` is None)."""
        if n is None or n >= len(self.prompts):
            return self
        if n <= 0:
            raise ValueError(f"Number of prompts must be positive, got {n}.")
        return PromptSet(f"{self.name}[:{n}]", self.prompts[:n])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "count": len(self.prompts), "sha256": self.sha256}


def _data_file(name: str) -> Path:
    return Path(str(resources.files("safety_guard") / "data" / name))


def builtin_records(kind: str) -> list[dict[str, str]]:
    """All records (``id``, ``category``, ``split``, ``prompt``) of a built-in set.

    The harmful set's ``probe`` split (``harmful_probe.jsonl``, with a ``style`` field too) is
    used only by the training guard's probe.

    Example:
        >>> sorted({r["split"] for r in builtin_records("harmful")})
        ['align', 'attack', 'heldout', 'probe']
    """
    if kind not in _BUILTIN_FILES:
        raise ValueError(f"Unknown built-in prompt set {kind!r}; choose 'harmful' or 'benign'.")
    records = []
    for name in _BUILTIN_FILES[kind]:
        with _data_file(name).open(encoding="utf-8") as fh:
            records += [json.loads(line) for line in fh if line.strip()]
    return records


def load_text_lines(name: str) -> list[str]:
    """Non-empty lines of a packaged text file (``refusals.txt``, ``compliance.txt`` ...)."""
    return [
        line.strip()
        for line in _data_file(name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def _clean(values: Iterable[Any]) -> tuple[str, ...]:
    return tuple(str(v).strip() for v in values if v is not None and str(v).strip())


def _pick_column(columns: Sequence[str], column: str | None, source: str) -> str:
    if column is not None:
        if column not in columns:
            raise ValueError(
                f"{source} has no column {column!r}; its columns are {list(columns)}. "
                "Pass the right one with column=... (CLI: --prompt-column)."
            )
        return column
    for candidate in _COLUMN_CANDIDATES:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"{source} has no prompt column: looked for {list(_COLUMN_CANDIDATES)}, found "
        f"{list(columns)}. Name the column with column=... (CLI: --prompt-column)."
    )


def load_prompts(
    source: str | Path | Sequence[str],
    *,
    column: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    name: str | None = None,
) -> PromptSet:
    """Load a prompt set.

    Args:
        source: ``"builtin:harmful"`` / ``"builtin:benign"`` (optionally ``":<split>"``, one of
            ``align``, ``attack``/``finetune``, ``heldout``, ``probe`` (harmful), ``all``); a ``.csv`` file (AdvBench
            layout: a ``goal`` column); a ``.jsonl``/``.json`` file of objects; a ``.txt`` file
            (one prompt a line); a ``datasets`` name or local dataset folder; or a list of
            strings.
        column: the column/key holding the prompt (default: the first of ``goal``, ``prompt``,
            ``instruction``, ``question``, ``text``, ``query``).
        split: the ``datasets`` split (default ``"train"``) or the built-in split.
        limit: keep only the first ``limit`` prompts.
        name: a display name (default: derived from ``source``).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an empty set, or no usable column.
    """
    if isinstance(source, Sequence) and not isinstance(source, str):
        prompts = _clean(source)
        return PromptSet(name or "custom", prompts or ()).head(limit)
    text = str(source)
    if text.startswith("builtin:"):
        parts = text.split(":")
        kind = parts[1] if len(parts) > 1 else ""
        chosen = split or (parts[2] if len(parts) > 2 else _BUILTIN_DEFAULT_SPLIT.get(kind, ""))
        records = builtin_records(kind)
        if chosen != "all":
            splits = {r["split"] for r in records}
            if chosen not in splits:
                raise ValueError(
                    f"Built-in set {kind!r} has splits {sorted(splits)} (or 'all'), not {chosen!r}."
                )
            records = [r for r in records if r["split"] == chosen]
        result = PromptSet(name or f"builtin:{kind}:{chosen}", _clean(r["prompt"] for r in records))
        return result.head(limit)

    path = Path(text)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".jsonl", ".json", ".txt"):
        if not path.exists():
            raise FileNotFoundError(f"Prompt file {path} does not exist.")
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                rows = list(reader)
                key = _pick_column(reader.fieldnames or [], column, str(path))
            prompts = _clean(row.get(key) for row in rows)
        elif suffix == ".txt":
            prompts = _clean(path.read_text(encoding="utf-8").splitlines())
        else:
            raw = path.read_text(encoding="utf-8")
            if suffix == ".json":
                data = json.loads(raw) if raw.strip() else []
                records = data if isinstance(data, list) else data.get("data", [])
            else:
                records = []
                for lineno, line in enumerate(raw.splitlines(), start=1):
                    if not line.strip():
                        continue
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno} is not valid JSON: {err}") from err
            if records and all(isinstance(r, str) for r in records):
                prompts = _clean(records)
            else:
                dicts = [r for r in records if isinstance(r, dict)]
                columns = list(dict.fromkeys(k for r in dicts for k in r))
                if not dicts:
                    prompts = ()
                else:
                    key = _pick_column(columns, column, str(path))
                    prompts = _clean(r.get(key) for r in dicts)
        if not prompts:
            raise ValueError(f"Prompt file {path} holds no non-empty prompts.")
        return PromptSet(name or path.name, prompts).head(limit)

    # a datasets name, or a local dataset folder
    import datasets

    try:
        dataset = datasets.load_dataset(text, split=split or "train")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{text!r} is neither a prompt file (.csv/.jsonl/.json/.txt), 'builtin:harmful'/"
            f"'builtin:benign', nor a dataset that datasets.load_dataset can find: {err}"
        ) from err
    key = _pick_column(dataset.column_names, column, text)
    prompts = _clean(dataset[key])
    if not prompts:
        raise ValueError(f"Dataset {text!r} column {key!r} holds no non-empty prompts.")
    return PromptSet(name or f"{text}:{split or 'train'}", prompts).head(limit)
