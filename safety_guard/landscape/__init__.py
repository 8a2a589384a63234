"""The safety landscape of an aligned model (the paper's method): which landscape
(:mod:`.config`), the directions (:mod:`.directions`) and the moved weights (:mod:`.perturb`),
the walk that scores each point (:mod:`.run`), the file it leaves (:mod:`.file`), and the basin
and VISAGE read from it (:mod:`.analysis`).

Example:
    >>> from safety_guard.landscape import LandscapeConfig
    >>> LandscapeConfig(num_directions=2).dims
    1
"""

from safety_guard.landscape.config import LandscapeConfig, format_grid, parse_grid
from safety_guard.landscape.file import (
    FORMAT,
    FORMAT_VERSION,
    Landscape,
    LandscapeFileError,
    LandscapeMismatchError,
)
from safety_guard.landscape.run import compute_landscape

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Landscape",
    "LandscapeConfig",
    "LandscapeFileError",
    "LandscapeMismatchError",
    "compute_landscape",
    "format_grid",
    "parse_grid",
]
