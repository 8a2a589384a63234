"""Landscape plots: ASR against α per direction (1D), or a filled contour and a surface (2D).

Example:
    >>> plot_landscape("landscape.json", "plots/landscape.png")  # doctest: +SKIP
    PosixPath('plots/landscape.png')
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from safety_guard.landscape import Landscape
from safety_guard.landscape.analysis import basin_edges
from safety_guard.plots.common import (
    ASR_CMAP,
    direction_label,
    finite_number,
    new_figure,
    require_matplotlib,
    save_png,
)

__all__ = ["asr_contour", "plot_landscape", "surface_grid"]


def _default_title(landscape: Landscape) -> str:
    name = (landscape.data.get("model") or {}).get("name") or "model"
    if not any(0.0 in c["alphas"] for c in landscape.curves()):  # 2D: no VISAGE to show
        return f"{name} — safety landscape"
    v = landscape.visage()
    return f"{name} — VISAGE {v['mean']:.1f} ± {v['std']:.1f} (n = {v['num_directions']})"


def _basin_of(curve: dict[str, Any], edge_asr: float) -> dict[str, Any] | None:
    """The stored basin of a curve, or one computed from its points when it was not stored."""
    basin = curve.get("basin")
    if basin is not None:
        return basin
    alphas, asr = curve["alphas"], curve["asr"]
    if 0.0 in alphas and all(finite_number(s) is not None for s in asr):
        return basin_edges(alphas, asr, edge_asr).to_dict()
    return None


def _plot_1d(fig: Figure, landscape: Landscape, curves: list[dict[str, Any]]) -> None:
    from matplotlib.patches import Patch

    edge = landscape.edge_asr
    has_nll = any(finite_number(v) is not None for c in curves for v in c["nll"])
    if has_nll:
        ax, ax_nll = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    else:
        ax, ax_nll = fig.subplots(1, 1), None
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for index, (curve, color) in enumerate(zip(curves, colors, strict=True)):
        pts = [
            (a, s)
            for a, s in zip(curve["alphas"], curve["asr"], strict=True)
            if finite_number(s) is not None
        ]
        if not pts:
            continue
        visage_value = finite_number(curve.get("visage"))
        label = direction_label(curve["direction"], index) + (
            f" — VISAGE {visage_value:.1f}" if visage_value is not None else " — VISAGE n/a"
        )
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, color=color, label=label)
        basin = _basin_of(curve, edge)
        if basin and basin.get("origin_inside"):
            lower, upper = finite_number(basin.get("lower")), finite_number(basin.get("upper"))
            if lower is not None and upper is not None and upper > lower:
                ax.axvspan(lower, upper, color=color, alpha=0.08, linewidth=0)
                if ax_nll is not None:
                    ax_nll.axvspan(lower, upper, color=color, alpha=0.08, linewidth=0)
        if ax_nll is not None:
            nll_pts = [
                (a, v)
                for a, v in zip(curve["alphas"], curve["nll"], strict=True)
                if finite_number(v) is not None
            ]
            if nll_pts:
                nx, ny = zip(*nll_pts, strict=True)
                ax_nll.plot(nx, ny, marker="s", markersize=3, linewidth=1.2, color=color)
    ax.axhline(
        edge, color="0.3", linestyle="--", linewidth=1, label=f"basin edge (ASR ≥ {edge:g}%)"
    )
    ax.axvline(0.0, color="0.6", linestyle=":", linewidth=1)
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-3, 103)
    ax.grid(True, alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    handles.append(Patch(facecolor="0.5", alpha=0.2, label="safety basin (shaded, per direction)"))
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize="small",
        borderaxespad=0,
    )
    if ax_nll is not None:
        ax_nll.axvline(0.0, color="0.6", linestyle=":", linewidth=1)
        ax_nll.set_ylabel("capability NLL\n(lower = better)")
        ax_nll.set_xlabel("α (perturbation along direction)")
        ax_nll.grid(True, alpha=0.3)
    else:
        ax.set_xlabel("α (perturbation along direction)")


def surface_grid(
    surface: dict[str, Any],
) -> tuple[list[float], list[float], np.ndarray]:
    """(α values, β values, ASR[β, α] with NaN where not measured) of a 2D landscape."""
    points = [p for p in surface.get("points") or [] if finite_number(p.get("asr")) is not None]
    alphas = sorted({float(p["alpha"]) for p in points} | set(surface.get("alphas") or []))
    betas = sorted({float(p["beta"]) for p in points} | set(surface.get("betas") or []))
    if len(alphas) < 2 or len(betas) < 2:
        raise ValueError(
            f"A 2D landscape plot needs at least 2 α and 2 β values, got {len(alphas)} × "
            f"{len(betas)}."
        )
    a_index = {a: i for i, a in enumerate(alphas)}
    b_index = {b: j for j, b in enumerate(betas)}
    z = np.full((len(betas), len(alphas)), np.nan)
    for p in points:
        z[b_index[float(p["beta"])], a_index[float(p["alpha"])]] = float(p["asr"])
    return alphas, betas, z


def asr_contour(
    fig: Figure,
    ax: Any,
    landscape: Landscape,
    surface: dict[str, Any],
    grid: tuple[list[float], list[float], np.ndarray],
) -> None:
    """The filled ASR contour of a 2D landscape over (α, β), its basin edge and the origin."""
    alphas, betas, z = grid
    grid_a, grid_b = np.meshgrid(alphas, betas)
    masked = np.ma.masked_invalid(z)
    filled = ax.contourf(grid_a, grid_b, masked, levels=np.linspace(0.0, 100.0, 11), cmap=ASR_CMAP)
    edge = landscape.edge_asr
    if np.nanmin(z) < edge <= np.nanmax(z):
        ax.contour(grid_a, grid_b, masked, levels=[edge - 1e-9], colors="k", linewidths=1.2)
        ax.set_title(f"ASR (%) — black line: basin edge ({edge:g}%)", fontsize="medium")
    else:
        ax.set_title("ASR (%)", fontsize="medium")
    ax.plot([0.0], [0.0], marker="*", markersize=12, color="k", markerfacecolor="white")
    ax.annotate("origin", (0.0, 0.0), xytext=(6, 6), textcoords="offset points", fontsize="small")
    names = [direction_label(d, i) for i, d in enumerate(surface.get("directions") or [{}, {}])] + [
        "α",
        "β",
    ]
    ax.set_xlabel(f"α ({names[0]})")
    ax.set_ylabel(f"β ({names[1]})")
    ax.set_aspect("auto")
    fig.colorbar(filled, ax=ax, label="ASR (%)")


def _plot_2d(fig: Figure, landscape: Landscape, surface: dict[str, Any]) -> None:
    from matplotlib.ticker import MaxNLocator

    alphas, betas, z = grid = surface_grid(surface)
    a_index = {a: i for i, a in enumerate(alphas)}
    b_index = {b: j for j, b in enumerate(betas)}
    grid_a, grid_b = np.meshgrid(alphas, betas)
    cmap = ASR_CMAP
    asr_contour(fig, fig.add_subplot(1, 2, 1), landscape, surface, grid)

    ax3 = fig.add_subplot(1, 2, 2, projection="3d")
    ax3.computed_zorder = False  # keep the origin marker drawn above the surface
    ax3.plot_surface(
        grid_a, grid_b, z, cmap=cmap, vmin=0.0, vmax=100.0, linewidth=0.2, alpha=0.8, zorder=1
    )
    origin = z[b_index[0.0], a_index[0.0]] if 0.0 in a_index and 0.0 in b_index else np.nan
    if math.isfinite(origin):
        ax3.scatter(
            [0.0], [0.0], [origin], color="k", s=40, marker="o", depthshade=False, zorder=10
        )
    for axis in (ax3.xaxis, ax3.yaxis):
        axis.set_major_locator(MaxNLocator(5))
    ax3.tick_params(labelsize="small")
    ax3.set_xlabel("α")
    ax3.set_ylabel("β")
    ax3.set_zlabel("ASR (%)")
    ax3.set_zlim(0, 100)
    ax3.set_title("ASR surface (dot: origin)", fontsize="medium")


def plot_landscape(
    landscape: Landscape | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Plot a landscape to a PNG file.

    A 1D landscape gives ASR (%) against α for every direction (markers at measured points), each
    direction's basin shaded, the edge threshold dashed and, below, the capability NLL of the
    reference answers (lower is better). A 2D landscape (``data["surface"]`` and no 1D points)
    gives a filled ASR contour over (α, β) with a colorbar next to a 3D surface.

    Args:
        landscape: a :class:`~safety_guard.landscape.Landscape` or the path of a landscape file.
        path: the PNG to write (parent folders are created; written atomically).
        title: figure title (default: model name and VISAGE mean ± std).
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the landscape holds no measured point.
        LandscapeFileError: ``landscape`` is a path that is not a readable landscape file.
        MissingExtraError: matplotlib is not installed (``pip install "safety-guard[plots]"``).
    """
    require_matplotlib()
    if not isinstance(landscape, Landscape):
        landscape = Landscape.load(landscape)
    curves = [c for c in landscape.curves() if c["alphas"]]
    surface = landscape.data.get("surface")
    if not curves and not (surface and surface.get("points")):
        raise ValueError(
            "This landscape holds no measured point, so there is nothing to plot. Compute it "
            "first (safety-guard landscape MODEL --output FILE)."
        )
    if curves:
        fig = new_figure((10.5, 6.5))
        _plot_1d(fig, landscape, curves)
    else:
        fig = new_figure((13, 5.5))
        _plot_2d(fig, landscape, surface)
    fig.suptitle(title if title is not None else _default_title(landscape))
    return save_png(fig, path, dpi)
