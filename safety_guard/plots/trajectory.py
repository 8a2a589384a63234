"""The plot of a finetune watched by the training guard.

Example:
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

if TYPE_CHECKING:
    pass

from safety_guard.landscape import Landscape
from safety_guard.plots.common import (
    EVENT_COLORS,
    finite_number,
    new_figure,
    require_matplotlib,
    save_png,
)

__all__ = ["plot_trajectory"]


def _multiple_key(key: Any) -> tuple[float, str]:
    number = finite_number(key)
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
    rows = [r for r in records or [] if finite_number(r.get("step")) is not None]
    if not rows:
        raise ValueError(
            "No trajectory records to plot (each record needs at least a 'step'); got "
            f"{len(records or [])} record(s)."
        )
    rows.sort(key=lambda r: float(r["step"]))

    def series(get: Any) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in rows:
            y = finite_number(get(r))
            if y is not None:
                xs.append(float(r["step"]))
                ys.append(y)
        return xs, ys

    fig = new_figure((11.5, 7.0))
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
        name = f"θ₀ + {m}·δ" if finite_number(m) is not None else f"θ₀ + s·δ ({m})"
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
    halt_step = finite_number((halt or {}).get("step"))
    if halt_step is not None and not any(
        r.get("event") == "halt" and float(r["step"]) == halt_step for r in rows
    ):  # a halt on non-finite weights or loss: no probe row says it
        rows = [*rows, {"step": halt_step, "event": "halt"}]
    for r in rows:
        event = r.get("event")
        if event in EVENT_COLORS:
            for ax in (ax_rise, ax_disp):
                ax.axvline(
                    float(r["step"]),
                    color=EVENT_COLORS[event],
                    linewidth=1.5,
                    alpha=0.8,
                    label=(
                        ("would halt (halt=False)" if monitor and event == "halt" else event)
                        if ax is ax_rise and event not in seen
                        else None
                    ),
                )
            seen.add(event)
    restored = finite_number((halt or {}).get("restored"))
    if restored is not None:
        for ax in (ax_rise, ax_disp):
            ax.axvline(
                restored,
                color="tab:green",
                linestyle="-.",
                linewidth=1.5,
                label=f"adapter of step {restored:g} put back" if ax is ax_rise else None,
            )
    eta = [r for r in rows if finite_number(r.get("eta_steps")) is not None]
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
    return save_png(fig, path, dpi)


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
        displacement = finite_number(r.get("displacement"))
        ahead = sorted((r.get("lookahead") or {}).items(), key=lambda kv: _multiple_key(kv[0]))
        for m, point in ahead:
            point = point if isinstance(point, dict) else {}
            lower = finite_number(point.get("lower"))
            multiple = finite_number(point.get("multiple")) or finite_number(m)
            if lower is not None and lower >= promise and multiple and displacement:
                return float(r["step"]), f"{multiple:g}", multiple * displacement
    return None
