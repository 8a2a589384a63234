"""PNG plots of safety landscapes and of training-guard trajectories.

Figures are drawn with :class:`matplotlib.figure.Figure` and the Agg canvas directly, never through
``pyplot``, so plotting neither needs a display nor changes the backend a notebook or script has
chosen. Files are written atomically (temporary file in the same folder, then rename).

* :func:`plot_landscape` — a 1D landscape: ASR (%) against α for every direction, with each
  direction's safety basin shaded, the edge threshold dashed, and the capability (NLL of the
  reference answers) in a panel below; or a 2D landscape: a filled ASR contour over (α, β) and a
  3D surface.
* :func:`plot_trajectory` — a finetune watched by the training guard: the ASR rise of the
  current model and of the points ahead on its line against the promise, with warnings, the halt
  and its reason, the adapter put back and the safety ETA; and the weight displacement against
  the step, compared with the displacement at which a point ahead passed the promise.

Example:
    >>> from safety_guard.landscape import Landscape
    >>> from safety_guard.plots import plot_landscape, plot_trajectory
    >>> plot_landscape("landscape.json", "plots/landscape.png")  # doctest: +SKIP
    PosixPath('plots/landscape.png')
    >>> records = [
    ...     {"step": 0, "displacement": 0.0, "rise": 0.0},
    ...     {"step": 50, "displacement": 0.08, "rise": 4.0,
    ...      "lookahead": {"2": {"rise": 14.0, "lower": 11.0}}, "event": "warn"},
    ... ]
    >>> plot_trajectory(records, "plots/trajectory.png", promise=10)  # doctest: +SKIP
    PosixPath('plots/trajectory.png')
"""

from __future__ import annotations

import math
import os
import textwrap
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
    promise: float | None = None,
    halt: dict[str, Any] | None = None,
    landscape: Landscape | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Plot a guarded finetune to a PNG file: what the guard decided on, and why.

    Top panel: the ASR **rise** over the aligned model (points) of the current model and of
    each point ahead on the finetune's line (θ₀ + s·δ), the points ahead with their lower bound
    (the rise less ``confidence_z`` standard errors), against the promise line
    (``max_asr_rise``); warnings (orange) and the halt (red) as vertical lines, the step whose
    adapter was put back (green), and where the safety ETA says the promise breaks (×).
    Bottom panel: the layer-normalized displacement against the step (log scale), with the
    displacement at which a point ahead first passed the promise, and the landscape's random
    basin radius, labelled for what it is (how far *random* noise can go).

    Args:
        records: one dict per check: ``step``, ``displacement`` and optionally ``rise`` (the
            current model's), ``lookahead`` (``{"2": {"rise": r, "lower": b}}``),
            ``eta_steps`` and ``event`` (``"warn"``/``"halt"``/None). Missing keys and None
            values are skipped.
        path: the PNG to write (parent folders are created; written atomically).
        promise: ``max_asr_rise`` (the line the decisions are about).
        halt: ``{"step", "reason", "restored"}`` of a halted run (``restored``: the step whose
            adapter was put back, or None); ``"monitor": True`` for the first halt decision of a
            run with ``halt=False`` (drawn as "would halt").
        landscape: the model's landscape, for the basin-radius reference line.
        title: figure title (default: "guarded finetune"; a halt adds its reason).
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``records`` is empty or no record has a step.
        MissingExtraError: matplotlib is not installed (``pip install "safety-guard[plots]"``).

    Example:
        >>> rows = [{"step": 4, "displacement": 1e-3, "rise": 0.0,
        ...          "lookahead": {"2": {"rise": 12.0, "lower": 9.0}}, "eta_steps": 6}]
        >>> plot_trajectory(rows, "trajectory.png", promise=10)  # doctest: +SKIP
        PosixPath('trajectory.png')
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

    fig = _figure((11.5, 7.0))
    ax_rise, ax_disp = fig.subplots(2, 1, sharex=True)

    if promise is not None:
        ax_rise.axhline(
            promise,
            color="tab:red",
            linestyle="--",
            linewidth=1.2,
            label=f"the promise: rise < {promise:g} points",
        )
    xs, ys = series(lambda r: r.get("rise"))
    if xs:
        ax_rise.plot(xs, ys, marker="o", markersize=4, color="k", label="rise now")
    multiples = sorted(
        {k for r in rows if isinstance(r.get("lookahead"), dict) for k in r["lookahead"]},
        key=_multiple_key,
    )
    for i, m in enumerate(multiples):
        color = f"C{i % 10}"
        name = f"θ₀ + {m}·δ" if _number(m) is not None else f"θ₀ + s·δ ({m})"
        for key, marker, size, style, label in (
            ("rise", "^", 4, "--", f"rise at {name}, ahead"),
            ("lower", "v", 3, ":", "  its lower bound (what a halt reads)"),
        ):
            xs, ys = series(lambda r, m=m, key=key: _ahead(r, m).get(key))
            if xs:
                ax_rise.plot(
                    xs,
                    ys,
                    marker=marker,
                    markersize=size,
                    linestyle=style,
                    color=color,
                    label=label,
                )
    seen: set[str] = set()
    monitor = bool((halt or {}).get("monitor"))
    halt_step = _number((halt or {}).get("step"))
    if halt_step is not None and not any(
        r.get("event") == "halt" and float(r["step"]) == halt_step for r in rows
    ):  # a halt on non-finite weights or loss: no probe row says it
        rows = [*rows, {"step": halt_step, "event": "halt"}]
    for r in rows:
        event = r.get("event")
        if event in _EVENT_COLORS:
            for ax in (ax_rise, ax_disp):
                ax.axvline(
                    float(r["step"]),
                    color=_EVENT_COLORS[event],
                    linewidth=1.5,
                    alpha=0.8,
                    label=(
                        ("would halt (halt=False)" if monitor and event == "halt" else event)
                        if ax is ax_rise and event not in seen
                        else None
                    ),
                )
            seen.add(event)
    restored = _number((halt or {}).get("restored"))
    if restored is not None:
        for ax in (ax_rise, ax_disp):
            ax.axvline(
                restored,
                color="tab:green",
                linestyle="-.",
                linewidth=1.5,
                label=f"adapter of step {restored:g} put back" if ax is ax_rise else None,
            )
    eta = [r for r in rows if _number(r.get("eta_steps")) is not None]
    if eta and promise is not None:
        last = eta[-1]
        at = float(last["step"]) + float(last["eta_steps"])
        ax_rise.plot(
            [at],
            [promise],
            marker="X",
            markersize=10,
            color="tab:red",
            linestyle="none",
            label=f"ETA at step {last['step']}: the promise breaks ≈ step {at:g}",
        )
    ax_rise.set_ylabel("ASR rise over the\naligned model (points)")
    ax_rise.grid(True, alpha=0.3)

    xs, ys = series(lambda r: r.get("displacement"))
    if xs:
        ax_disp.plot(xs, ys, marker="o", markersize=4, color="C0", label="displacement ‖δ‖")
    crossing = _first_crossing(rows, promise)
    if crossing is not None:
        step, multiple, value = crossing
        ax_disp.axhline(
            value,
            color="tab:red",
            linestyle="--",
            linewidth=1.2,
            label=f"θ₀ + {multiple}·δ at step {step:g}: first point past the promise",
        )
    if landscape is not None and landscape.has_basin_radius():
        radius = landscape.basin_radius()["mean"]
        ax_disp.axhline(
            radius,
            color="0.55",
            linestyle=":",
            linewidth=1.2,
            label=f"random-direction basin radius ({radius:.3g}):\nhow far random noise goes "
            "safely, not a finetune",
        )
    ax_disp.set_ylabel("displacement\n(layer-normalized)")
    ax_disp.set_xlabel("training step")
    ax_disp.grid(True, alpha=0.3)
    if any(y > 0 for y in ys):  # a finetune's displacement spans orders of magnitude
        ax_disp.set_yscale("log", nonpositive="mask")
    for ax in (ax_rise, ax_disp):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    head = title if title is not None else "guarded finetune"
    if halt and halt.get("reason"):
        verb = "would have halted (halt=False)" if monitor else "halted"
        head += f": {verb} at step {halt.get('step'):g}\n" + textwrap.fill(str(halt["reason"]), 110)
    fig.suptitle(head, fontsize="medium")
    return _save(fig, path, dpi)


def _ahead(row: dict[str, Any], multiple: str) -> dict[str, Any]:
    """A row's point ahead at ``multiple`` (``{}`` when missing or not a dict)."""
    point = (
        (row.get("lookahead") or {}).get(multiple)
        if isinstance(row.get("lookahead"), dict)
        else None
    )
    return point if isinstance(point, dict) else {}


def _first_crossing(
    rows: Sequence[dict[str, Any]], promise: float | None
) -> tuple[float, str, float] | None:
    """(step, multiple, displacement of θ₀ + s·δ) of the first point ahead whose lower bound
    reached the promise, or None."""
    if promise is None:
        return None
    for r in rows:
        displacement = _number(r.get("displacement"))
        ahead = sorted((r.get("lookahead") or {}).items(), key=lambda kv: _multiple_key(kv[0]))
        for m, point in ahead:
            point = point if isinstance(point, dict) else {}
            lower = _number(point.get("lower"))
            multiple = _number(point.get("multiple")) or _number(m)
            if lower is not None and lower >= promise and multiple and displacement:
                return float(r["step"]), f"{multiple:g}", multiple * displacement
    return None
