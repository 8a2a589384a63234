"""Plots of landscapes and training-guard trajectories: PNGs are written, nothing global changes."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest

from safety_guard.landscape import Landscape, LandscapeConfig
from safety_guard.plots import plot_landscape, plot_trajectory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALPHAS = [-0.2, -0.1, 0.0, 0.1, 0.2]


def _empty(dims: int = 1, directions: int = 2) -> Landscape:
    config = LandscapeConfig(
        dims=dims,
        num_directions=directions,
        alphas=ALPHAS,
        search="grid",
    )
    specs = config.direction_specs() if dims == 1 else []
    return Landscape.new(config, {"judge": "keyword"}, {}, "tiny-model", "float32", specs)


def _landscape_1d() -> Landscape:
    land = _empty()
    curves = [
        ([100.0, 40.0, 0.0, 10.0, 100.0], [3.0, 2.2, 2.0, 2.1, 3.5]),
        ([80.0, 20.0, 0.0, 60.0, 100.0], [None, 2.4, 2.0, None, 4.0]),
    ]
    for entry, (asr, nll) in zip(land.data["directions"], curves, strict=True):
        entry["points"] = [
            {"alpha": a, "asr": s, "nll": n} for a, s, n in zip(ALPHAS, asr, nll, strict=True)
        ]
    land.data["origin"] = {"asr": 0.0, "nll": 2.0}
    land.summarize()
    return land


def _landscape_2d() -> Landscape:
    land = _empty(dims=2)
    land.data["surface"] = {
        "directions": [
            {"kind": "random", "seed": 0, "normalization": "layer"},
            {"kind": "random", "seed": 1, "normalization": "layer"},
        ],
        "alphas": ALPHAS,
        "betas": ALPHAS,
        "points": [
            {"alpha": a, "beta": b, "asr": min(100.0, 1500.0 * (a * a + b * b)), "nll": 2.0}
            for b in ALPHAS
            for a in ALPHAS
        ],
    }
    land.summarize()
    return land


def _assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1024
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp.png")]


def test_plot_landscape_1d(tmp_path: Path) -> None:
    out = plot_landscape(_landscape_1d(), tmp_path / "new" / "folder" / "land.png")
    assert out == tmp_path / "new" / "folder" / "land.png"
    _assert_png(out)


def test_plot_landscape_1d_without_summary_or_nll(tmp_path: Path) -> None:
    land = _landscape_1d()
    for entry in land.data["directions"]:
        entry["basin"] = entry["visage"] = None
        for p in entry["points"]:
            p.pop("nll")
    _assert_png(plot_landscape(land, tmp_path / "land.png", title="custom", dpi=60))


def test_plot_landscape_from_saved_file(tmp_path: Path) -> None:
    file = tmp_path / "landscape.json"
    _landscape_1d().save(file)
    _assert_png(plot_landscape(file, tmp_path / "from_file.png"))
    _assert_png(plot_landscape(str(file), str(tmp_path / "from_str.png")))


def test_plot_landscape_2d(tmp_path: Path) -> None:
    _assert_png(plot_landscape(_landscape_2d(), tmp_path / "surface.png"))


def test_plot_landscape_2d_partial_surface(tmp_path: Path) -> None:
    land = _landscape_2d()
    land.data["surface"]["points"] = land.data["surface"]["points"][:12]
    _assert_png(plot_landscape(land, tmp_path / "partial.png"))


def test_backend_unchanged(tmp_path: Path) -> None:
    before = matplotlib.get_backend()
    plot_landscape(_landscape_1d(), tmp_path / "a.png")
    plot_landscape(_landscape_2d(), tmp_path / "b.png")
    plot_trajectory([{"step": 0, "displacement": 0.0}], tmp_path / "c.png")
    assert matplotlib.get_backend() == before


def test_empty_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no measured point"):
        plot_landscape(_empty(), tmp_path / "x.png")
    with pytest.raises(ValueError, match="no measured point"):
        plot_landscape(_empty(dims=2), tmp_path / "x.png")
    with pytest.raises(ValueError, match="No trajectory records"):
        plot_trajectory([], tmp_path / "y.png")
    assert not list(tmp_path.iterdir())


TRAJECTORY = [
    {"step": 0, "displacement": 0.0, "rise": 0.0},
    {
        "step": 20,
        "displacement": 0.03,
        "rise": 1.0,
        "lookahead": {"2": {"rise": 6.0, "lower": 4.0}, "4": {"rise": 12.0, "lower": 9.0}},
        "eta_steps": 30,
    },
    {
        "step": 40,
        "displacement": 0.07,
        "rise": 4.0,
        "lookahead": {"2": {"rise": 13.0, "lower": 10.5}, "4": {"rise": 40.0, "lower": 35.0}},
        "eta_steps": 12,
        "event": "warn",
    },
    {"step": 60, "displacement": 0.11, "rise": 9.0, "event": "halt"},
]
HALT = {"step": 60, "reason": "at θ₀ + 2·δ the ASR would rise 13 points", "restored": 20}


def test_plot_trajectory_without_landscape(tmp_path: Path) -> None:
    _assert_png(plot_trajectory(TRAJECTORY, tmp_path / "sub" / "traj.png"))


def test_plot_trajectory_with_landscape(tmp_path: Path) -> None:
    _assert_png(plot_trajectory(TRAJECTORY, tmp_path / "traj.png", landscape=_landscape_1d()))


def _drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the trajectory and path plots draw, kept as they are saved."""
    from safety_guard.plots import common, path, trajectory

    figures = []

    def keep(fig, file, dpi):  # type: ignore[no-untyped-def]
        figures.append(fig)
        return common.save_png(fig, file, dpi)

    for module in (trajectory, path):
        monkeypatch.setattr(module, "save_png", keep)
    return figures


def test_the_plot_explains_a_halt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The promise line, the rises ahead with their lower bounds, the ETA, the halt's reason,
    the adapter put back; the displacement where a point ahead first passed the promise, and
    the random basin radius labelled for what it is."""
    figures = _drawn(monkeypatch)
    plot_trajectory(
        TRAJECTORY, tmp_path / "traj.png", promise=10, halt=HALT, landscape=_landscape_1d()
    )
    fig = figures[0]
    ax_rise, ax_disp = fig.axes
    labels = [line.get_label() for line in ax_rise.get_lines()]
    assert "the promise: rise < 10 points" in labels
    assert "rise at θ₀ + 2·δ, ahead" in labels and "rise at θ₀ + 4·δ, ahead" in labels
    assert labels.count("  its lower bound (what a halt reads)") == 2
    assert "adapter of step 20 put back" in labels
    eta = next(line for line in ax_rise.get_lines() if line.get_label().startswith("ETA"))
    assert eta.get_label() == "ETA at step 40: the promise breaks ≈ step 52"
    assert list(eta.get_xdata()) == [52.0] and list(eta.get_ydata()) == [10.0]
    assert "halted at step 60" in fig._suptitle.get_text()
    assert "would rise 13 points" in fig._suptitle.get_text()
    crossing = next(
        line for line in ax_disp.get_lines() if "first point past the promise" in line.get_label()
    )
    # step 20: θ₀ + 4·δ's lower bound 9 < 10; step 40: θ₀ + 2·δ's 10.5 ≥ 10 → 2 × 0.07
    assert crossing.get_label().startswith("θ₀ + 2·δ at step 40")
    assert list(crossing.get_ydata()) == [pytest.approx(0.14)] * 2
    radius = next(line for line in ax_disp.get_lines() if "basin radius" in line.get_label())
    assert "random noise" in radius.get_label()
    assert ax_disp.get_yscale() == "log"


def test_plot_trajectory_landscape_without_random_direction(tmp_path: Path) -> None:
    land = _landscape_1d()
    for entry in land.data["directions"]:
        entry["direction"] = {"kind": "interpolation", "target": "ft", "source": "origin"}
    _assert_png(plot_trajectory(TRAJECTORY, tmp_path / "traj.png", landscape=land))
    _assert_png(plot_trajectory(TRAJECTORY, tmp_path / "traj2.png", landscape=_landscape_2d()))


def test_plot_trajectory_missing_keys(tmp_path: Path) -> None:
    records = [{"step": 0}, {"step": 5, "displacement": 0.01}, {"step": 10, "rise": None}]
    _assert_png(plot_trajectory(records, tmp_path / "sparse.png"))


def test_a_monitor_run_shows_where_it_would_have_halted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = _drawn(monkeypatch)
    rows = [{k: v for k, v in r.items() if k != "event"} for r in TRAJECTORY]
    monitor = {"step": 40, "reason": "the ASR would rise", "monitor": True}
    plot_trajectory(rows, tmp_path / "m.png", promise=10, halt=monitor)
    ax_rise, _ = figures[0].axes
    assert "would halt (halt=False)" in [line.get_label() for line in ax_rise.get_lines()]
    assert "would have halted (halt=False) at step 40" in figures[0]._suptitle.get_text()


def test_old_rows_and_old_run_folders_still_plot(tmp_path: Path, caplog) -> None:
    """Rows with ASR lookaheads (an earlier format) skip those values; a run folder whose
    summary has no settings plots with the defaults and says so."""
    import json
    import logging

    from safety_guard.guard.outputs import plot_run_folder

    old_rows = [{"step": 1, "displacement": 0.01, "lookahead": {"2": 40.0}}]
    _assert_png(plot_trajectory(old_rows, tmp_path / "old.png", promise=10))
    folder = tmp_path / "run"
    folder.mkdir()
    record = {"step": 1, "event": "check", "displacement": 0.01, "cosine": None}
    (folder / "trajectory.jsonl").write_text(json.dumps(record) + "\n")
    (folder / "summary.json").write_text(json.dumps({"halt_step": 1, "halt_reason": "loss is nan"}))
    with caplog.at_level(logging.WARNING):
        _assert_png(plot_run_folder(folder))
    assert "records no settings" in caplog.text


def _path_landscape() -> Landscape:
    land = _landscape_2d()
    land.data["surface"]["directions"][0] = {"kind": "lora", "adapter": "run/last-safe"}
    return land


PATH = [
    {"step": 2, "alpha": 0.5, "status": "ok", "ahead": {2.0: 1.0}},
    {"step": 4, "alpha": 1.0, "status": "ok", "ahead": {2.0: 2.0}},
    {"step": 8, "alpha": 1.8, "status": "halt", "ahead": {2.0: 3.6}},
]


def test_the_path_plot_marks_the_halt_what_it_read_ahead_and_the_state_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safety_guard.plots import plot_path

    figures = _drawn(monkeypatch)
    _assert_png(plot_path(_path_landscape(), PATH, tmp_path / "p.png", halt=8, restored=4))
    ax = figures[0].axes[0]
    drawn = {(line.get_marker(), tuple(line.get_xdata())) for line in ax.get_lines()}
    assert ("X", (1.8,)) in drawn  # the halt
    assert ("o", (3.6,)) in drawn  # θ₀ + 2·δ at the halt
    assert ("*", (1.0,)) in drawn  # the adapter of step 4, put back
    assert ("o", (0.5,)) in drawn and ("o", (1.0,)) in drawn  # the probes within the promise
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "probed, within the promise (step below)",
        "halt (step 8)",
        "the point the halt read ahead",
        "put back (step 4)",
    ]
    # θ₀ put back (no probe within the promise before the halt): the star at the origin; a
    # halt that is no probe's (a NaN loss) has no marker and no legend entry
    plot_path(_path_landscape(), PATH[:2], tmp_path / "q.png", halt=3, restored=0)
    ax = figures[1].axes[0]
    assert ("*", (0.0,)) in {
        (line.get_marker(), tuple(line.get_xdata())) for line in ax.get_lines()
    }
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["probed, within the promise (step below)", "put back (step 0)"]
    with pytest.raises(ValueError, match="2D landscape"):
        plot_path(_landscape_1d(), PATH, tmp_path / "r.png")
