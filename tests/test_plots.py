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
    {"step": 0, "displacement": 0.0, "asr": 0.0, "edge_distance": 0.15, "nll": 2.0},
    {"step": 20, "displacement": 0.03, "asr": 2.0, "lookahead": {"2": 10.0, "4": 40.0}},
    {
        "step": 40,
        "displacement": 0.07,
        "asr": 8.0,
        "lookahead": {"2": 30.0, "4": 90.0},
        "event": "warn",
    },
    {"step": 60, "displacement": 0.11, "asr": 30.0, "edge_distance": None, "event": "halt"},
]


def test_plot_trajectory_without_landscape(tmp_path: Path) -> None:
    _assert_png(plot_trajectory(TRAJECTORY, tmp_path / "sub" / "traj.png"))


def test_plot_trajectory_with_landscape(tmp_path: Path) -> None:
    _assert_png(plot_trajectory(TRAJECTORY, tmp_path / "traj.png", landscape=_landscape_1d()))


def test_plot_trajectory_axes_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Displacement on a log axis, the edge distance (another unit) on its own right-hand axis."""
    from safety_guard import plots as plotting

    figures = []
    real_save = plotting._save

    def keep(fig, path, dpi):  # type: ignore[no-untyped-def]
        figures.append(fig)
        return real_save(fig, path, dpi)

    monkeypatch.setattr(plotting, "_save", keep)
    plot_trajectory(TRAJECTORY, tmp_path / "traj.png", landscape=_landscape_1d())
    _, ax_disp, ax_edge = figures[0].axes
    assert ax_disp.get_yscale() == "log"
    assert [line.get_label() for line in ax_edge.get_lines()] == [
        "distance to basin edge (× displacement, right axis)"
    ]
    assert list(ax_edge.get_lines()[0].get_ydata()) == [0.15]

    figures.clear()
    no_edge = [{k: v for k, v in r.items() if k != "edge_distance"} for r in TRAJECTORY]
    plot_trajectory(no_edge, tmp_path / "traj2.png")
    assert len(figures[0].axes) == 2


def test_plot_trajectory_landscape_without_random_direction(tmp_path: Path) -> None:
    land = _landscape_1d()
    for entry in land.data["directions"]:
        entry["direction"] = {"kind": "interpolation", "target": "ft", "source": "origin"}
    _assert_png(plot_trajectory(TRAJECTORY, tmp_path / "traj.png", landscape=land))
    _assert_png(plot_trajectory(TRAJECTORY, tmp_path / "traj2.png", landscape=_landscape_2d()))


def test_plot_trajectory_missing_keys(tmp_path: Path) -> None:
    records = [{"step": 0}, {"step": 5, "displacement": 0.01}, {"step": 10, "asr": None}]
    _assert_png(plot_trajectory(records, tmp_path / "sparse.png"))
