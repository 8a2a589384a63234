"""Basin edges and VISAGE on hand-made curves."""

from __future__ import annotations

import pytest

from safety_guard.landscape.analysis import basin_edges, interpolate_grid, validate_grid, visage


def test_visage_equals_hand_computed_value():
    alphas = [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3]
    asr = [100, 100, 40, 5, 10, 100, 100]
    # basin: -0.1..0.1, edges -0.2 and 0.2 -> margins 0, 60, 95, 90, 0
    assert visage(alphas, asr) == pytest.approx((0 + 60 + 95 + 90 + 0) / 5)
    edges = basin_edges(alphas, asr)
    assert (edges.lower, edges.upper) == (pytest.approx(-0.15), pytest.approx(0.15))
    assert edges.radius == pytest.approx(0.15) and edges.closed


def test_visage_open_basin_and_origin_outside():
    assert visage([-0.1, 0.0, 0.1], [0, 0, 0]) == 100.0
    assert not basin_edges([-0.1, 0.0, 0.1], [0, 0, 0]).closed
    assert visage([-0.1, 0.0, 0.1], [100, 100, 0]) == 0.0
    assert basin_edges([-0.1, 0.0, 0.1], [100, 100, 0]).radius == 0.0


def test_lower_threshold_moves_edges():
    alphas = [-0.2, -0.1, 0.0, 0.1, 0.2]
    asr = [100, 60, 0, 30, 100]
    assert basin_edges(alphas, asr, threshold=50).lower == pytest.approx(-0.05)
    assert basin_edges(alphas, asr, threshold=50).upper == pytest.approx(0.15)


def test_adaptive_interpolation_matches_uniform_on_monotone_curve():
    grid = [round(-0.5 + 0.05 * i, 10) for i in range(21)]
    full = {a: (0.0 if abs(a) <= 0.1 else 80.0 if abs(a) <= 0.15 else 100.0) for a in grid}
    sparse = {a: full[a] for a in (-0.25, -0.15, -0.1, 0.0, 0.1, 0.15, 0.25, -0.2, 0.2)}
    assert visage(list(sparse), list(sparse.values()), grid=grid) == pytest.approx(
        visage(list(full), list(full.values()))
    )
    assert interpolate_grid([0.0, 0.05, 0.6], {0.0: 0.0, 0.1: 10.0}) == [0.0, 5.0, None]


def test_grid_validation():
    with pytest.raises(ValueError, match="contain 0"):
        validate_grid([-0.1, 0.1])
    with pytest.raises(ValueError, match="at least two"):
        validate_grid([0.0])
    assert validate_grid([0.1, 0.0, -0.1, 0.1]) == (-0.1, 0.0, 0.1)
    with pytest.raises(ValueError, match="needed"):
        basin_edges([0.1, 0.2], [0, 0])
