"""PNG plots of safety landscapes and of training-guard trajectories.

Figures are drawn with :class:`matplotlib.figure.Figure` and the Agg canvas directly, never through
``pyplot``, so plotting neither needs a display nor changes the backend a notebook or script has
chosen. Files are written atomically (temporary file in the same folder, then rename).

* :func:`plot_landscape` — a 1D landscape: ASR (%) against α for every direction, with each
  direction's safety basin shaded, the edge threshold dashed, and the capability (NLL of the
  reference answers) in a panel below; or a 2D landscape: a filled ASR contour over (α, β) and a
  3D surface.
* :func:`plot_trajectory` — a finetune watched by the training guard: ASR of the current model
  (and of the look-ahead extrapolations) against the step, with warn/halt events, and the size of
  the weight displacement against the step, compared with the landscape's basin radius.

Example:
    >>> from safety_guard.landscape import Landscape
    >>> from safety_guard.plots import plot_landscape, plot_trajectory
    >>> plot_landscape("landscape.json", "plots/landscape.png")  # doctest: +SKIP
    PosixPath('plots/landscape.png')
    >>> records = [
    ...     {"step": 0, "displacement": 0.0, "asr": 2.0},
    ...     {"step": 50, "displacement": 0.08, "asr": 10.0, "lookahead": {"2": 40.0}, "event": "warn"},
    ... ]
    >>> plot_trajectory(records, "plots/trajectory.png")  # doctest: +SKIP
    PosixPath('plots/trajectory.png')
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from safety_guard._extras import require
from safety_guard.files import atomic_path
from safety_guard.landscape import Landscape
from safety_guard.landscape.analysis import basin_edges

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_landscape", "plot_trajectory", "require_matplotlib"]

_EVENT_COLORS = {"warn": "tab:orange", "halt": "tab:red"}


# -- helpers --------------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Check that matplotlib (the ``plots`` extra) is installed.

    Raises:
        safety_guard._extras.MissingExtraError: (an ``ImportError``) it is not; the message
            says ``pip install "safety-guard[plots]"``.

    Example:
        >>> require_matplotlib()  # doctest: +SKIP
    """
    require("matplotlib", "plots", purpose="Plotting")


def _figure(figsize: tuple[float, float]) -> Figure:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, None, NaN, not a number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int) -> Path:
    """Render ``fig`` to a PNG at ``path`` atomically (creating parent folders), with the
    permissions of the user's umask."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure; no global backend involved
    with atomic_path(path, suffix=".tmp.png") as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    return path


def _direction_label(direction: dict[str, Any], index: int) -> str:
    kind = direction.get("kind", "direction")
    if "seed" in direction:
        return f"{kind} seed {direction['seed']}"
    return f"{kind} #{index}"


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
    if 0.0 in alphas and all(_number(s) is not None for s in asr):
        return basin_edges(alphas, asr, edge_asr).to_dict()
    return None


# -- landscapes -----------------------------------------------------------------------------------


def _plot_1d(fig: Figure, landscape: Landscape, curves: list[dict[str, Any]]) -> None:
    from matplotlib.patches import Patch

    edge = landscape.edge_asr
    has_nll = any(_number(v) is not None for c in curves for v in c["nll"])
    if has_nll:
        ax, ax_nll = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    else:
        ax, ax_nll = fig.subplots(1, 1), None
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for index, (curve, color) in enumerate(zip(curves, colors, strict=True)):
        pts = [
            (a, s)
            for a, s in zip(curve["alphas"], curve["asr"], strict=True)
            if _number(s) is not None
        ]
        if not pts:
            continue
        visage_value = _number(curve.get("visage"))
        label = _direction_label(curve["direction"], index) + (
            f" — VISAGE {visage_value:.1f}" if visage_value is not None else " — VISAGE n/a"
        )
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, color=color, label=label)
        basin = _basin_of(curve, edge)
        if basin and basin.get("origin_inside"):
            lower, upper = _number(basin.get("lower")), _number(basin.get("upper"))
            if lower is not None and upper is not None and upper > lower:
                ax.axvspan(lower, upper, color=color, alpha=0.08, linewidth=0)
                if ax_nll is not None:
                    ax_nll.axvspan(lower, upper, color=color, alpha=0.08, linewidth=0)
        if ax_nll is not None:
            nll_pts = [
                (a, v)
                for a, v in zip(curve["alphas"], curve["nll"], strict=True)
                if _number(v) is not None
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


def _plot_2d(fig: Figure, landscape: Landscape, surface: dict[str, Any]) -> None:
    from matplotlib.ticker import MaxNLocator

    points = [p for p in surface.get("points") or [] if _number(p.get("asr")) is not None]
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
    grid_a, grid_b = np.meshgrid(alphas, betas)
    masked = np.ma.masked_invalid(z)
    levels = np.linspace(0.0, 100.0, 11)
    cmap = "RdYlGn_r"
    names = [
        _direction_label(d, i) for i, d in enumerate(surface.get("directions") or [{}, {}])
    ] + ["α", "β"]
    xlabel, ylabel = f"α ({names[0]})", f"β ({names[1]})"

    ax = fig.add_subplot(1, 2, 1)
    filled = ax.contourf(grid_a, grid_b, masked, levels=levels, cmap=cmap, extend="neither")
    edge = landscape.edge_asr
    if np.nanmin(z) < edge <= np.nanmax(z):
        ax.contour(grid_a, grid_b, masked, levels=[edge - 1e-9], colors="k", linewidths=1.2)
        ax.set_title(f"ASR (%) — black line: basin edge ({edge:g}%)", fontsize="medium")
    else:
        ax.set_title("ASR (%)", fontsize="medium")
    ax.plot([0.0], [0.0], marker="*", markersize=12, color="k", markerfacecolor="white")
    ax.annotate("origin", (0.0, 0.0), xytext=(6, 6), textcoords="offset points", fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_aspect("auto")
    fig.colorbar(filled, ax=ax, label="ASR (%)")

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
        fig = _figure((10.5, 6.5))
        _plot_1d(fig, landscape, curves)
    else:
        fig = _figure((13, 5.5))
        _plot_2d(fig, landscape, surface)
    fig.suptitle(title if title is not None else _default_title(landscape))
    return _save(fig, path, dpi)


# -- training trajectories ------------------------------------------------------------------------


def _multiple_key(key: Any) -> tuple[float, str]:
    number = _number(key)
    return (number if number is not None else math.inf, str(key))


def plot_trajectory(
    records: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    landscape: Landscape | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Plot a training-guard trajectory to a PNG file.

    Top panel: ASR (%) of the current model and of each look-ahead multiple against the step,
    with vertical lines at ``warn`` (orange) and ``halt`` (red) events. Bottom panel: the
    layer-normalized displacement from the original weights against the step (log scale), with the
    landscape's mean random basin radius as a horizontal line when ``landscape`` is given and has
    random directions, and the distance to the basin edge (in multiples of the current
    displacement) on a right-hand axis when recorded.

    Args:
        records: one dict per check, with ``step`` and ``displacement``, and optionally ``asr``,
            ``edge_distance``, ``lookahead`` (``{"2": asr, "4": asr}``), ``nll`` and ``event``
            (``"warn"``/``"halt"``/None). Missing keys and None values are skipped.
        path: the PNG to write (parent folders are created; written atomically).
        landscape: the model's landscape, for the basin-radius reference line.
        title: figure title (default: "training-guard trajectory").
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``records`` is empty or no record has a step.
        MissingExtraError: matplotlib is not installed (``pip install "safety-guard[plots]"``).
    """
    require_matplotlib()
    rows = [r for r in records or [] if _number(r.get("step")) is not None]
    if not rows:
        raise ValueError(
            "No trajectory records to plot (each record needs at least a 'step'); got "
            f"{len(records or [])} record(s)."
        )
    rows.sort(key=lambda r: float(r["step"]))

    def series(get: Any) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in rows:
            y = _number(get(r))
            if y is not None:
                xs.append(float(r["step"]))
                ys.append(y)
        return xs, ys

    fig = _figure((10.5, 6.5))
    ax_asr, ax_disp = fig.subplots(2, 1, sharex=True)

    xs, ys = series(lambda r: r.get("asr"))
    if xs:
        ax_asr.plot(xs, ys, marker="o", markersize=4, color="k", label="ASR now")
    multiples = sorted(
        {k for r in rows if isinstance(r.get("lookahead"), dict) for k in r["lookahead"]},
        key=_multiple_key,
    )
    for i, m in enumerate(multiples):
        mx, my = series(lambda r, m=m: (r.get("lookahead") or {}).get(m))
        if mx:
            ax_asr.plot(
                mx,
                my,
                marker="^",
                markersize=4,
                linestyle="--",
                color=f"C{i % 10}",
                label=f"look-ahead ×{m}",
            )
    if landscape is not None:
        ax_asr.axhline(
            landscape.edge_asr, color="0.4", linestyle=":", linewidth=1, label="basin edge ASR"
        )
    seen: set[str] = set()
    for r in rows:
        event = r.get("event")
        if event in _EVENT_COLORS:
            for ax in (ax_asr, ax_disp):
                ax.axvline(
                    float(r["step"]),
                    color=_EVENT_COLORS[event],
                    linewidth=1.5,
                    alpha=0.8,
                    label=event if ax is ax_asr and event not in seen else None,
                )
            seen.add(event)
    ax_asr.set_ylabel("ASR (%)")
    ax_asr.set_ylim(-3, 103)
    ax_asr.grid(True, alpha=0.3)

    xs, ys = series(lambda r: r.get("displacement"))
    if xs:
        ax_disp.plot(xs, ys, marker="o", markersize=4, color="C0", label="displacement")
    ex, ey = series(lambda r: r.get("edge_distance"))
    ax_edge = None
    if ex:
        # another unit (multiples of the current displacement): its own axis on the right
        ax_edge = ax_disp.twinx()
        ax_edge.plot(
            ex,
            ey,
            marker="s",
            markersize=3,
            linestyle="--",
            color="C2",
            label="distance to basin edge (× displacement, right axis)",
        )
        ax_edge.set_ylabel("basin edge ahead\n(× current displacement)", color="C2")
        ax_edge.set_ylim(bottom=0)
    if landscape is not None and landscape.has_basin_radius():
        radius = landscape.basin_radius()["mean"]
        ax_disp.axhline(
            radius,
            color="tab:purple",
            linestyle="--",
            linewidth=1.2,
            label=f"basin radius (random dirs, mean {radius:.3g})",
        )
    ax_disp.set_ylabel("displacement\n(layer-normalized)")
    ax_disp.set_xlabel("training step")
    ax_disp.grid(True, alpha=0.3)
    # a finetune's displacement is often orders of magnitude below the random basin radius
    if any(y > 0 for y in ys):
        ax_disp.set_yscale("log", nonpositive="mask")

    if ax_asr.get_legend_handles_labels()[0]:
        ax_asr.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    handles, labels = ax_disp.get_legend_handles_labels()
    if ax_edge is not None:
        more = ax_edge.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        # right of the secondary axis' labels
        ax_disp.legend(
            handles, labels, loc="upper left", bbox_to_anchor=(1.12, 1.0), fontsize="small"
        )
    fig.suptitle(title if title is not None else "training-guard trajectory")
    return _save(fig, path, dpi)
