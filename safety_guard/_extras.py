"""Optional dependencies: imported where they are needed, with an error that names the extra.

``pip install safety-guard`` is enough to compute landscapes and guard a finetune. The offline
testbed needs ``safety-guard[testbed]`` (``trl``, ``gguf``, ``psutil``) and the plots need
``safety-guard[plots]`` (``matplotlib``).

Example:
    >>> require("json", "plots").__name__
    'json'
    >>> require("surely_not_installed_module", "plots")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    MissingExtraError: ... pip install "safety-guard[plots]"
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """A package of an optional extra is not installed; the message says how to install it.

    Attributes:
        package: the missing package (its import name).
        extra: the safety-guard extra that installs it.
    """

    def __init__(self, package: str, extra: str, purpose: str | None = None) -> None:
        self.package = package
        self.extra = extra
        what = purpose or "This part of safety-guard"
        super().__init__(
            f"{what} needs the package {package!r}, which is not installed. It comes with the "
            f'extra [{extra}]: pip install "safety-guard[{extra}]"',
            name=package,
        )


def require(module: str, extra: str, purpose: str | None = None) -> ModuleType:
    """Import ``module``; if it is not installed, raise :class:`MissingExtraError` naming ``extra``.

    Only the absence of ``module`` itself becomes a :class:`MissingExtraError`: an installed
    package that fails to import (a broken install, a missing dependency of its own) raises its
    own error.

    Args:
        module: the import name, e.g. ``"matplotlib"`` or ``"matplotlib.figure"``.
        extra: the safety-guard extra that installs it, e.g. ``"plots"``.
        purpose: what needs it, for the message (e.g. ``"Plotting"``).

    Example:
        >>> require("json", "plots").dumps([1])
        '[1]'
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is None or err.name.split(".")[0] != top:
            raise
        raise MissingExtraError(top, extra, purpose) from err
