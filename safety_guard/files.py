"""Writing files and folders atomically, with the permissions the user's umask asks for.

Every file safety-guard writes (landscape files, plots, ``last-safe/`` checkpoints, ...) goes
through these helpers: the content is written to a temporary file (or folder) next to the
target and renamed into place, so a reader never sees half a file and a crash leaves the old
one. :func:`tempfile.mkstemp` creates files ``0600`` and :func:`tempfile.mkdtemp` folders
``0700``; here the result gets ``0o666 & ~umask`` (files) or ``0o777 & ~umask`` (folders), as
``open()`` and ``mkdir()`` would give.

:func:`output_lock` keeps two processes from writing the same output at once.

Example:
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(folder / "result.json", '{"ok": true}\\n').name
    'result.json'
    >>> (folder / "result.json").read_text()
    '{"ok": true}\\n'
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "OutputLockedError",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "current_umask",
    "output_lock",
]

PathLike = str | os.PathLike[str]

logger = logging.getLogger(__name__)


#: flock's answers on file systems without locks (some Lustre, NFS and FUSE mounts)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


class OutputLockedError(OSError):
    """Another process holds the lock of an output (see :func:`output_lock`)."""


def _os_error(kind: type[OSError], code: int | None, message: str) -> OSError:
    """An ``OSError`` of type ``kind`` whose text is just ``message`` (no ``[Errno n]``), with
    ``errno`` set for callers that look at it."""
    err = kind(message)
    err.errno = code
    return err


def current_umask() -> int:
    """The process's umask, read without leaving it changed.

    Read from ``/proc/self/status`` where the kernel reports it (no window in which another
    thread could create a file under a wrong umask); elsewhere set to 0 and restored at once.

    Example:
        >>> old = os.umask(0o027)
        >>> oct(current_umask())
        '0o27'
        >>> _ = os.umask(old)
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            status = fh.read()
    except OSError:  # no procfs (macOS, a sandbox): the umask(0) round trip below
        status = ""
    for line in status.splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cannot_write(path: Path, err: OSError, setting: str | None = None) -> OSError:
    """``err`` (raised while creating ``path``'s folder or a temporary file next to it)
    re-worded to name ``path`` (and the ``setting`` it came from), not the temporary file."""
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        reason = f"{blocker} is a file, not a folder"
    else:
        reason = f"{(err.strerror or str(err)).lower()} (in folder {path.parent})"
    what = f"{setting} {path}" if setting else str(path)
    return _os_error(
        type(err),
        err.errno,
        f"Cannot write {what}: {reason}. Choose a writable location or fix the folder's "
        "permissions.",
    )


def _prepare(path: PathLike, setting: str | None = None) -> Path:
    """``path`` as a ``Path`` whose folder exists, or an ``OSError`` that names it."""
    path = Path(path)
    if path.is_dir():
        what = f"{setting} {path}" if setting else str(path)
        raise _os_error(
            IsADirectoryError,
            errno.EISDIR,
            f"Cannot write {what}: it is a folder. Give a file name (inside it).",
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot_write(path, err, setting) from err
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file path next to ``path``, renamed onto ``path`` when the block succeeds.

    The temporary file exists (empty) when the block starts; write it by name (``savefig``,
    ``torch.save``, another library's writer). On success it gets the umask's permissions and
    replaces ``path`` in one rename; on an exception it is removed and ``path`` is untouched.
    Parent folders are created.

    Args:
        path: the file to write.
        suffix: the temporary file's suffix (some writers pick the format from it, e.g.
            ``".tmp.png"``).

    Raises:
        OSError: the folder cannot be written (the message names ``path``, not the temporary
            file).

    Example:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "plot.png"
        >>> with atomic_path(target, suffix=".tmp.png") as tmp:
        ...     _ = tmp.write_bytes(b"\\x89PNG")
        >>> target.read_bytes()
        b'\\x89PNG'
    """
    path = _prepare(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as err:
        raise _cannot_write(path, err) from err
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``.

    Example:
        >>> import pathlib, tempfile
        >>> atomic_write_bytes(pathlib.Path(tempfile.mkdtemp()) / "a.bin", b"\\x00\\x01").name
        'a.bin'
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``.

    Example:
        >>> import pathlib, tempfile
        >>> target = atomic_write_text(pathlib.Path(tempfile.mkdtemp()) / "a.txt", "hello\\n")
        >>> target.read_text()
        'hello\\n'
    """
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """A temporary folder next to ``path``, put in place of ``path`` when the block succeeds.

    Fill the yielded folder; on success it gets the umask's permissions and is renamed to
    ``path``, replacing an old folder there (moved aside first, then deleted; a crash in between
    leaves it as ``.<name>.old-*`` next to ``path``). On an exception the temporary folder is
    deleted and ``path`` is untouched. Temporary names start with ``.<name>.``.

    Raises:
        OSError: the parent folder cannot be written, or ``path`` is a file.

    Example:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "last-safe"
        >>> with atomic_dir(target) as tmp:
        ...     _ = (tmp / "step.json").write_text('{"step": 3}')
        >>> sorted(p.name for p in target.iterdir())
        ['step.json']
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise _os_error(
            NotADirectoryError,
            errno.ENOTDIR,
            f"Cannot write folder {path}: a file of that name exists. Remove it.",
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as err:
        raise _cannot_write(path, err) from err
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


def check_writable(path: PathLike, setting: str = "the output") -> Path:
    """Check, before long work, that a file can be created at ``path``; returns ``path``.

    Creates the parent folders and a temporary file there (removed at once).

    Raises:
        OSError: naming ``setting`` and ``path``, with what to do.

    Example:
        >>> import pathlib, tempfile
        >>> check_writable(pathlib.Path(tempfile.mkdtemp()) / "out.json", "--output").name
        'out.json'
    """
    path = _prepare(path, setting)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=path.parent)
    except OSError as err:
        raise _cannot_write(path, err, setting) from err
    os.close(fd)
    os.unlink(name)
    return path


@contextlib.contextmanager
def output_lock(path: PathLike, setting: str = "--output") -> Iterator[Path]:
    """Hold an exclusive lock on ``<path>.lock`` for the block, refusing if it is taken.

    The lock is :func:`fcntl.flock` on a sibling file, taken without waiting; the lock file is
    removed when the block ends. Two processes that write the same output would otherwise
    overwrite each other's work, each believing it saved. Yields the lock file's path.

    Raises:
        OutputLockedError: another process holds the lock.
        OSError: the lock file cannot be created (the folder is not writable).

    Example:
        >>> import pathlib, tempfile
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "landscape.json"
        >>> with output_lock(out):  # doctest: +ELLIPSIS
        ...     with output_lock(out):
        ...         pass
        Traceback (most recent call last):
        ...
        safety_guard.files.OutputLockedError: another safety-guard process is writing ...
    """
    import fcntl

    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    while True:
        _prepare(lock, setting)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise _cannot_write(path, err, setting) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(
                f"another safety-guard process is writing {path} (lock {lock}); wait for it or "
                f"choose another {setting}.",
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_LOCKS:
                raise
            # some network and FUSE file systems have no flock: write without the lock
            logger.warning(
                "Cannot lock %s (%s): the file system has no file locks; writing %s without "
                "protection against a second writer.",
                lock,
                err.strerror or err,
                path,
            )
            lock.unlink(missing_ok=True)
            yield lock
            return
        except BaseException:
            os.close(fd)
            raise
        # the holder before us may have removed the file after we opened it: lock the new one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # while holding it: a waiter then retries on a new file
        os.close(fd)
