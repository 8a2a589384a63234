"""What the plots share: the matplotlib check, figures drawn without ``pyplot``, atomic PNG
writes, colours.

Example:
    >>> finite_number("3.5"), finite_number(float("nan"))
    (3.5, None)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from safety_guard._extras import require
from safety_guard.files import atomic_path

__all__ = [
    "ASR_CMAP",
    "EVENT_COLORS",
    "direction_label",
    "finite_number",
    "new_figure",
    "require_matplotlib",
    "save_png",
]

EVENT_COLORS = {"warn": "tab:orange", "halt": "tab:red"}
ASR_CMAP = "RdYlGn_r"


def require_matplotlib() -> None:
    """Check that matplotlib (the ``plots`` extra) is installed.

    Raises:
        safety_guard._extras.MissingExtraError: (an ``ImportError``) it is not; the message
            says ``pip install "safety-guard[plots]"``.

    Example:
        >>> require_matplotlib()  # doctest: +SKIP
    """
    require("matplotlib", "plots", purpose="Plotting")


def new_figure(figsize: tuple[float, float]) -> Figure:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, None, NaN, not a number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int) -> Path:
    """Render ``fig`` to a PNG at ``path`` atomically (creating parent folders), with the
    permissions of the user's umask."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure; no global backend involved
    with atomic_path(path, suffix=".tmp.png") as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    return path


def direction_label(direction: dict[str, Any], index: int) -> str:
    kind = direction.get("kind", "direction")
    if "seed" in direction:
        return f"{kind} seed {direction['seed']}"
    return f"{kind} #{index}"
