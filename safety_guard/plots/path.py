"""A finetune's path over a 2D landscape spanned by its own direction and a random one.

Example:
    >>> plot_path("path.json", [{"step": 4, "alpha": 1.0, "status": "ok", "ahead": {}}],
    ...           "path.png")  # doctest: +SKIP
    PosixPath('path.png')
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from safety_guard.landscape import Landscape
from safety_guard.plots.common import EVENT_COLORS, new_figure, require_matplotlib, save_png
from safety_guard.plots.landscape import asr_contour, surface_grid

__all__ = ["plot_path"]


def plot_path(
    landscape: Landscape | str | os.PathLike[str],
    path: Sequence[dict[str, Any]],
    output: str | os.PathLike[str],
    *,
    halt: int | None = None,
    restored: int | None = None,
    target_step: int | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """A finetune's path over a 2D landscape spanned by its own direction (α) and a random one (β).

    Left: the filled ASR contour with the run's probed states along β = 0 (o: within the
    promise, ▲: a warning, X: the halt), the point the halting probe measured ahead (hollow) and
    the state a halt put back (★). Right: the ASR along the finetune's line (the landscape at
    β = 0) with the same states marked.

    Args:
        landscape: a 2D landscape (``--direction interpolation --target T --dims 2``) or its file.
        path: the probed states: dicts with ``step``, ``alpha``, ``status`` and ``ahead``
            (multiple → α), as :func:`safety_guard.guard.path.run_path` gives them.
        output: the PNG to write (atomically).
        halt: the step the guard halted at; ``restored``: the step whose state it put back.
        target_step: the step whose state is α = 1 (for the axis label).
        title: figure title (default: says what the axes are).
        dpi: resolution.

    Example:
        >>> plot_path("path.json", [{"step": 4, "alpha": 1.0, "status": "ok", "ahead": {}}],
        ...           "path.png")  # doctest: +SKIP
        PosixPath('path.png')
    """
    require_matplotlib()
    if not isinstance(landscape, Landscape):
        landscape = Landscape.load(landscape)
    surface = landscape.data.get("surface")
    if not (surface and surface.get("points")):
        raise ValueError("A path is drawn over a 2D landscape (--dims 2); this one has none.")
    if not path:
        raise ValueError("The run has no probe to draw.")
    grid = surface_grid(surface)
    fig = new_figure((13, 5.5))
    ax = fig.add_subplot(1, 2, 1)
    asr_contour(fig, ax, landscape, surface, grid)
    target = f"the step-{target_step} state" if target_step is not None else "the target"
    ax.set_xlabel(f"α (finetune direction: θ₀ → {target} at α = 1)")
    alphas = [float(p["alpha"]) for p in path]
    ax.plot([0.0, *alphas], [0.0] * (len(alphas) + 1), color="k", linewidth=1.0, zorder=3)
    line = fig.add_subplot(1, 2, 2)
    a_values, betas, z = grid
    row = min(range(len(betas)), key=lambda j: abs(betas[j]))
    line.plot(
        a_values, z[row], color="tab:blue", marker=".", label=f"landscape, β = {betas[row]:g}"
    )
    line.axhline(landscape.edge_asr, color="k", linestyle="--", linewidth=0.8)
    for k, p in enumerate(path):
        status = "halt" if p["step"] == halt else str(p.get("status", "ok"))
        color = EVENT_COLORS.get(status, "k")
        marker = {"halt": "X", "warn": "^"}.get(status, "o")
        face = color if status in EVENT_COLORS else "white"
        a = float(p["alpha"])
        ax.plot(
            [a], [0.0], marker=marker, markersize=9, color=color, markerfacecolor=face, zorder=5
        )
        ax.annotate(
            str(p["step"]),
            (a, 0.0),
            xytext=(0, -14 if k % 2 == 0 else -24),
            textcoords="offset points",
            ha="center",
            fontsize="x-small",
        )
        line.axvline(a, color=color, linewidth=0.8, linestyle=":" if status == "ok" else "-")
        if p["step"] == halt:
            for s, ahead in sorted((p.get("ahead") or {}).items()):
                ax.plot(
                    [ahead],
                    [0.0],
                    marker="o",
                    markersize=10,
                    color=color,
                    markerfacecolor="none",
                    zorder=5,
                )
                ax.annotate(
                    f"θ₀ + {s:g}·δ at the halt",
                    (ahead, 0.0),
                    xytext=(0, 14),
                    textcoords="offset points",
                    ha="center",
                    fontsize="x-small",
                    color=color,
                )
    # the state a halt put back: a probe's, or θ₀ itself (step 0)
    put_back = {p["step"]: float(p["alpha"]) for p in path} | {0: 0.0}
    if restored is not None and restored in put_back:
        for axis in (ax, line):
            axis.plot(
                [put_back[restored]],
                [0.0],
                marker="*",
                markersize=15,
                color="gold",
                markeredgecolor="k",
                zorder=6,
                clip_on=False,
            )
    line.set_xlabel("α (along the finetune's line)")
    line.set_ylabel("ASR (%)")
    line.set_ylim(-2, 102)
    line.set_title("ASR along the finetune's line; lines: the probed states", fontsize="medium")
    line.legend(loc="upper left", fontsize="small")
    from matplotlib.lines import Line2D

    def key(marker: str, color: str, face: str, label: str, size: float = 8) -> Line2D:
        return Line2D(
            [],
            [],
            linestyle="",
            marker=marker,
            color=color,
            markerfacecolor=face,
            markersize=size,
            label=label,
        )

    handles = [key("o", "k", "white", "probed, within the promise (step below)")]
    if any(str(p.get("status")) == "warn" for p in path):
        handles.append(key("^", "tab:orange", "tab:orange", "probed, warning"))
    if any(p["step"] == halt for p in path):  # a halt on a probe (not on a NaN loss)
        handles += [
            key("X", "tab:red", "tab:red", f"halt (step {halt})"),
            key("o", "tab:red", "none", "the point the halt read ahead"),
        ]
    if restored is not None and restored in put_back:
        handles.append(key("*", "k", "gold", f"put back (step {restored})", 12))
    ax.legend(handles=handles, loc="upper right", fontsize="x-small")
    fig.suptitle(
        title
        if title is not None
        else "The finetune's path over its landscape (the probed states, along β = 0)"
    )
    return save_png(fig, output, dpi)
