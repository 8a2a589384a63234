"""Where the testbed lives: the cache folder, its build marker, and the build lock.

The cache root is ``$SAFETY_GUARD_CACHE``, else ``$XDG_CACHE_HOME/safety-guard``, else
``~/.cache/safety-guard``; the aligned model is ``<root>/testbed-v2``, complete once its
``testbed.json`` marker is valid.

Example:
    >>> testbed_dir("/tmp/sg-cache")
    PosixPath('/tmp/sg-cache/testbed-v2')
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_ENV",
    "MARKER_FORMAT",
    "MARKER_NAME",
    "MARKER_VERSION",
    "TESTBED_NAME",
    "cache_root",
    "read_marker",
    "testbed_dir",
]

logger = logging.getLogger(__name__)

#: Environment variable that overrides the cache root.
CACHE_ENV = "SAFETY_GUARD_CACHE"
#: Folder name of the aligned model inside the cache root (bump when the recipe changes).
TESTBED_NAME = "testbed-v2"
#: The build marker, written last: a folder without a valid one is a half-built cache.
MARKER_NAME = "testbed.json"
MARKER_FORMAT = "safety-guard-testbed"
MARKER_VERSION = 1
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$SAFETY_GUARD_CACHE``, else the XDG cache folder.

    Example:
        >>> cache_root("/tmp/sg-cache")
        PosixPath('/tmp/sg-cache')
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "safety-guard").absolute()


def testbed_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of the aligned model (it may not exist yet).

    Example:
        >>> testbed_dir("/tmp/sg-cache").name
        'testbed-v2'
    """
    return cache_root(cache_dir) / TESTBED_NAME


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The build marker of ``folder`` when the build there is complete, else ``None``.

    Complete means: ``testbed.json`` is valid JSON of this format and version, and every file it
    lists exists with the recorded size (so a folder whose marker or weights went missing, or
    whose copy was cut short, counts as half-built).

    Example:
        >>> read_marker("/nonexistent") is None
        True
    """
    folder = Path(folder)
    try:
        data = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        return None
    if data.get("version") != MARKER_VERSION:
        return None
    files = data.get("files")
    if not isinstance(files, dict) or not all(name in files for name in _REQUIRED_FILES):
        return None
    for name, size in files.items():
        path = folder / name
        try:
            if not path.is_file() or path.stat().st_size != size:
                return None
        except OSError:
            return None
    return data


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("Another process is building the testbed; waiting for it (%s).", lock_path)
        print(
            "safety-guard: another process is building the testbed; waiting for it…",
            file=sys.stderr,
            flush=True,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def remove_tree(path: Path) -> None:
    """Delete the folder ``path`` if it exists; a failure is logged with its cause, not raised.

    Used for the build's leftovers, where an undeletable file must not fail a finished build or
    hide the error that ended a failed one.
    """
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as err:
        logger.warning(
            "Could not delete %s (%s: %s); delete it by hand.", path, type(err).__name__, err
        )


def check_seed(marker: dict[str, Any], seed: int) -> None:
    if marker.get("seed") != seed:
        logger.warning(
            "The cached testbed was built with seed %s, not %s; reusing it. Pass rebuild=True "
            "(CLI: safety-guard testbed --rebuild) to rebuild it with this seed.",
            marker.get("seed"),
            seed,
        )
