"""The switch between screening first and generating every prompt, on synthetic counts."""

from __future__ import annotations

import math

import pytest

from safety_guard.landscape.screening import (
    flag_fraction,
    generates_every_prompt,
    nearest_flag_fraction,
)
from safety_guard.measure.probe import ProbeConfig


def _point(total, unsafe, flagged=None):
    point = {"total": total, "unsafe": unsafe}
    if flagged is not None:
        point["flagged_prompts"] = list(range(flagged))
    return point


def test_flag_fraction_counts_flags_else_unsafe_answers():
    assert flag_fraction(_point(80, 10, flagged=20)) == 0.25
    assert flag_fraction(_point(80, 60)) == 0.75  # no screen: the unsafe ones, a lower bound
    assert flag_fraction(_point(0, 0)) is None


def test_the_nearest_measured_point_predicts_and_ties_go_to_the_larger_fraction():
    line = [((0.0,), _point(80, 2, flagged=4)), ((0.5,), _point(80, 80, flagged=80))]
    assert nearest_flag_fraction(line, (0.1,)) == 0.05
    assert nearest_flag_fraction(line, (0.4,)) == 1.0
    assert nearest_flag_fraction(line, (0.25,)) == 1.0  # equally near: beyond the edge
    assert nearest_flag_fraction([], (0.1,)) is None
    surface = [((0.0, 0.0), _point(10, 0, flagged=1)), ((0.3, 0.3), _point(10, 10))]
    assert nearest_flag_fraction(surface, (0.1, 0.0)) == 0.1
    assert nearest_flag_fraction(surface, (0.3, 0.2)) == 1.0


def test_the_switch_fires_from_the_threshold_on():
    assert generates_every_prompt(0.8, 0.8) and generates_every_prompt(1.0, 0.8)
    assert not generates_every_prompt(0.79, 0.8)
    assert not generates_every_prompt(None, 0.8)  # nothing measured yet: screen first
    assert not generates_every_prompt(1.0, 1.01)  # above 1: always screen first


@pytest.mark.parametrize("bad", [0.0, -0.5, math.nan])
def test_generate_above_is_checked(bad):
    with pytest.raises(ValueError, match="generate_above"):
        ProbeConfig(generate_above=bad)
