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
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["MAX_PROMPT_CHARS", "PromptSet", "builtin_records", "load_prompts", "load_text_lines"]

logger = logging.getLogger(__name__)

#: The longest prompt :func:`load_prompts` accepts, in characters (about 4,000 tokens of English
#: text; AdvBench prompts are about 70). A longer one is almost always a broken file (e.g. an
#: unclosed quote that swallowed the lines after it), and the memory of generating grows with the
#: square of the prompt's length (a 51,000-character prompt asked for 13 GB). Pass
#: ``max_chars=`` to :func:`load_prompts` for long prompts on purpose.
MAX_PROMPT_CHARS = 16_000

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


def data_file(name: str) -> Path:
    """The path of a file shipped in ``safety_guard/data``."""
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
        with data_file(name).open(encoding="utf-8") as fh:
            records += [json.loads(line) for line in fh if line.strip()]
    return records


def load_text_lines(name: str) -> list[str]:
    """Non-empty lines of a packaged text file (``refusals.txt``, ``compliance.txt`` ...)."""
    return [
        line.strip()
        for line in data_file(name).read_text(encoding="utf-8").splitlines()
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


def _looks_like_path(text: str) -> bool:
    """Whether a prompt source names a local path rather than a hub dataset id (``org/name``)."""
    return (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or (os.sep != "/" and os.sep in text)
        or (os.altsep is not None and os.altsep != "/" and os.altsep in text)
    )


def _read_text(path: Path) -> str:
    """The file's text (UTF-8, with or without a byte-order mark), or a ``ValueError`` naming it."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"Prompt file {path} is not UTF-8 text: byte 0x{data[err.start]:02x} on line {line} "
            f"(offset {err.start}) cannot be decoded. Save it as UTF-8 (a CSV, JSONL or "
            "one-prompt-a-line text file), or point at the right file."
        ) from err
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise ValueError(
            f"Prompt file {path} holds a NUL byte on line {line}: it is a binary file, not "
            "CSV/JSONL/text. Point at the prompt file itself, saved as UTF-8 text."
        )
    return text


def _csv_rows(text: str, delimiter: str, quoting: int) -> list[tuple[int, list[str]]]:
    """``(first line, fields)`` of each non-empty record; ``csv.Error(message, first line,
    line reached)`` on a broken one."""
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delimiter, strict=True, quoting=quoting
    )
    rows: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for fields in reader:
            if fields:
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as err:
        raise csv.Error(str(err), start, reader.line_num) from err
    return rows


def _csv_values(
    path: Path, text: str, delimiter: str, column: str | None
) -> tuple[list[tuple[str, Any]], str]:
    """``(line, value)`` of the prompt column of each record, and the column's name.

    A TSV file that is not quoted CSV-style (a field that merely starts with ``"``) is read
    without quoting: tab-separated files usually hold no quoting at all."""
    try:
        rows = _csv_rows(text, delimiter, csv.QUOTE_MINIMAL)
    except csv.Error as err:
        if delimiter == "\t":
            rows = _csv_rows(text, delimiter, csv.QUOTE_NONE)
        else:
            start, line_num = err.args[1], err.args[2]
            raise ValueError(
                f"{path}:{start}: broken CSV record starting on line {start} ({err.args[0]}, on "
                f"line {line_num}). A field that opens with a double quote must close with one, "
                'and a quote inside a quoted field is written twice (""): fix the quoting on '
                f"line {start} (read as is, it would swallow the lines after it)."
            ) from err
    if not rows:
        raise ValueError(f"Prompt file {path} is empty: it needs a header line and prompts.")
    header_line, header = rows[0]
    key = _pick_column(header, column, str(path))
    index = header.index(key)
    values = []
    for line, fields in rows[1:]:
        if len(fields) > len(header) and any(f.strip() for f in fields[len(header) :]):
            raise ValueError(
                f"{path}:{line} has {len(fields)} fields, but the header (line {header_line}) "
                f"has {len(header)}: a field that holds {delimiter!r} must be quoted "
                f'("like{delimiter} this"). Fix line {line}.'
            )
        values.append((str(line), fields[index] if index < len(fields) else None))
    return values, key


def _record_values(
    path: Path, records: list[tuple[str, Any]], column: str | None, where: str
) -> tuple[list[tuple[str, Any]], str | None]:
    """``(location, value)`` of each JSON record's prompt, and the key (``None``: strings).

    Every record must be a string, or every record an object with the prompt key.
    """
    if all(isinstance(r, str) for _, r in records):
        return records, None
    for loc, record in records:
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}:{where}{loc} is a JSON {type(record).__name__}, not an object: every "
                'record must be an object with the prompt field (e.g. {"prompt": "..."}), or '
                "every record a string. Fix or remove it."
            )
    columns = list(dict.fromkeys(k for _, r in records for k in r))
    key = _pick_column(columns, column, str(path))
    values = []
    for loc, record in records:
        if key not in record:
            raise ValueError(
                f"{path}:{where}{loc} has no {key!r} field (it has {list(record)}): give every "
                "record the prompt field, or name the field with column=... (CLI: "
                "--prompt-column)."
            )
        value = record[key]
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"{path}:{where}{loc}: field {key!r} is a JSON {type(value).__name__}, not text. "
                "Every prompt must be a string."
            )
        values.append((loc, value))
    return values, key


def _file_values(path: Path, column: str | None) -> tuple[list[tuple[str, Any]], str | None, str]:
    """``(location, value)`` of every prompt in a prompt file, its column/key, and how a
    location is written (``"line 3"`` reads ``path:3``; a JSON array's records ``path:record 3``).
    """
    suffix = path.suffix.lower()
    text = _read_text(path)
    if suffix in (".csv", ".tsv"):
        values, key = _csv_values(path, text, "\t" if suffix == ".tsv" else ",", column)
        return values, key, ""
    if suffix == ".txt":
        return [(str(n), line) for n, line in enumerate(text.splitlines(), start=1)], None, ""
    if suffix == ".json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}. Fix the file.") from err
        if isinstance(data, dict):
            if not isinstance(data.get("data"), list):
                raise ValueError(
                    f"{path} holds a JSON object without a 'data' list: write a list of records "
                    '(or {"data": [...]}).'
                )
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a list of records.")
        records = [(str(i), r) for i, r in enumerate(data, start=1)]
        values, key = _record_values(path, records, column, "record ")
        return values, key, "record "
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((str(lineno), json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno} is not valid JSON: {err}. Fix the line.") from err
    values, key = _record_values(path, records, column, "")
    return values, key, ""


def _checked(
    values: Iterable[tuple[str, Any]], max_chars: int | None, source: str, where: str
) -> tuple[str, ...]:
    """The non-empty prompts, stripped; a ``ValueError`` for one longer than ``max_chars``."""
    prompts = []
    for loc, value in values:
        if value is None:
            continue
        prompt = str(value).strip()
        if not prompt:
            continue
        if max_chars is not None and len(prompt) > max_chars:
            raise ValueError(
                f"{source}:{where}{loc}: a prompt of {len(prompt):,} characters, more than the "
                f"limit of {max_chars:,} (MAX_PROMPT_CHARS). A prompt this long is usually a "
                "broken file (an unclosed quote that swallowed the lines after it); fix or "
                "shorten it, or, for long prompts on purpose, load them with "
                "load_prompts(..., max_chars=N) and pass the PromptSet in."
            )
        prompts.append(prompt)
    return tuple(prompts)


def _finish(prompts: PromptSet, limit: int | None, where: str) -> PromptSet:
    """Log how many prompts were read from ``where`` and how many are used; warn when fewer
    than ``limit`` are there."""
    result = prompts.head(limit)
    logger.info("Read %d prompts from %s; using %d.", len(prompts), where, len(result))
    if limit is not None and limit > len(prompts):
        logger.warning(
            "Asked for %d prompts, but %s holds only %d: measuring on %d. Use a larger prompt "
            "set, or ask for at most %d (CLI: --num-prompts / --num-benign).",
            limit,
            where,
            len(prompts),
            len(prompts),
            len(prompts),
        )
    return result


def load_prompts(
    source: str | Path | Sequence[str],
    *,
    column: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    name: str | None = None,
    max_chars: int | None = MAX_PROMPT_CHARS,
) -> PromptSet:
    """Load a prompt set.

    Logs (INFO) how many prompts it read and from where; warns when ``limit`` asks for more
    prompts than the source holds.

    Args:
        source: ``"builtin:harmful"`` / ``"builtin:benign"`` (optionally ``":<split>"``, one of
            ``align``, ``attack``/``finetune``, ``heldout``, ``probe`` (harmful), ``all``); a
            ``.csv``/``.tsv`` file (AdvBench layout: a ``goal`` column); a ``.jsonl``/``.json``
            file of objects (or of strings); a ``.txt`` file (one prompt a line); a
            ``datasets`` name or local dataset folder; or a list of strings. Files are UTF-8,
            with or without a byte-order mark.
        column: the column/key holding the prompt (default: the first of ``goal``, ``prompt``,
            ``instruction``, ``question``, ``text``, ``query``).
        split: the ``datasets`` split (default ``"train"``) or the built-in split.
        limit: keep only the first ``limit`` prompts.
        name: a display name (default: derived from ``source``).
        max_chars: the longest prompt accepted (default :data:`MAX_PROMPT_CHARS`; ``None``: no
            limit).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an empty set, no usable column, a file that is not UTF-8 text, a broken CSV
            record, a JSON record that is not an object with the prompt field, or a prompt
            longer than ``max_chars`` (each naming the file and line).

    Example:
        >>> load_prompts(["How do I pick a lock?", "  "], name="mine").prompts
        ('How do I pick a lock?',)
    """
    if isinstance(source, Sequence) and not isinstance(source, str):
        prompts = _checked(
            ((str(i), v) for i, v in enumerate(source, start=1)), max_chars, "prompt list", "#"
        )
        return _finish(PromptSet(name or "custom", prompts), limit, "the given list")
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
        return _finish(result, limit, f"builtin:{kind}:{chosen}")

    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".jsonl", ".json", ".txt"):
        if not path.exists():
            raise FileNotFoundError(f"Prompt file {path} does not exist.")
        if path.is_dir():
            raise ValueError(f"Prompt file {path} is a folder; point at the file inside it.")
        values, key, where = _file_values(path, column)
        prompts = _checked(values, max_chars, str(path), where)
        if not prompts:
            raise ValueError(f"Prompt file {path} holds no non-empty prompts.")
        origin = str(path.resolve()) + (f" (field {key!r})" if key else "")
        return _finish(PromptSet(name or path.name, prompts), limit, origin)

    if _looks_like_path(text) and not path.exists():
        raise FileNotFoundError(
            f"Prompt source {text!r}: the local path {path.absolute()} does not exist. Give an "
            "existing prompt file (.csv/.tsv/.jsonl/.json/.txt) or dataset folder, 'builtin:harmful' / "
            "'builtin:benign', or a hub dataset id (org/name)."
        )
    # a datasets name, or a local dataset folder
    import datasets

    try:
        dataset = datasets.load_dataset(
            str(path) if path.exists() else text, split=split or "train"
        )
    except (FileNotFoundError, ConnectionError) as err:  # (offline: ConnectionError)
        local = "" if path.exists() else f" There is no local path {path.absolute()} either."
        raise FileNotFoundError(
            f"{text!r} is neither a prompt file (.csv/.tsv/.jsonl/.json/.txt), 'builtin:harmful'/"
            f"'builtin:benign', nor a dataset that datasets.load_dataset can find: {err}.{local}"
        ) from err
    key = _pick_column(dataset.column_names, column, text)
    where = f"{text}:{split or 'train'}"
    prompts = _checked(((str(i), v) for i, v in enumerate(dataset[key])), max_chars, where, "row ")
    if not prompts:
        raise ValueError(f"Dataset {text!r} column {key!r} holds no non-empty prompts.")
    return _finish(PromptSet(name or where, prompts), limit, f"dataset {where} (column {key!r})")
