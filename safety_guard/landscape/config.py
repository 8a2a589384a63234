"""Which landscape to compute: :class:`LandscapeConfig`, and the α grids it walks.

Example:
    >>> cfg = LandscapeConfig(num_directions=2, alphas=(-0.2, -0.1, 0.0, 0.1, 0.2))
    >>> cfg.direction_specs()
    [{'kind': 'random', 'seed': 0, 'normalization': 'layer'}, {'kind': 'random', 'seed': 1, 'normalization': 'layer'}]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from safety_guard.landscape.analysis import (
    MAX_GRID_POINTS,
    validate_grid,
)
from safety_guard.landscape.directions import RandomDirection
from safety_guard.models.parameters import ParameterSelection

__all__ = ["LandscapeConfig", "format_grid", "parse_grid"]


def parse_grid(spec: str) -> tuple[float, ...]:
    """``"-0.5:0.5:21"`` (start:stop:count) or ``"-0.1,0,0.1"`` → a validated grid.

    Example:
        >>> parse_grid("-0.1:0.1:3")
        (-0.1, 0.0, 0.1)
    """
    spec = spec.strip()
    n = 0
    try:
        if ":" in spec:
            start_text, stop_text, count = spec.split(":")
            start, stop, n = float(start_text), float(stop_text), int(count)
            if n < 2:
                raise ValueError
        else:
            values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(
            f"Cannot read grid {spec!r}: write start:stop:count (e.g. -0.5:0.5:21) or a comma "
            "list (e.g. -0.1,0,0.1)."
        ) from err
    if n > MAX_GRID_POINTS:  # before making the list (a count of 10**12 would never end)
        raise ValueError(
            f"Grid {spec!r} asks for {n:,} points, more than {MAX_GRID_POINTS} "
            "(MAX_GRID_POINTS); each point probes the model once. Use fewer, e.g. -0.5:0.5:21."
        )
    if n:
        values = [start + (stop - start) * i / (n - 1) for i in range(n)]
    return validate_grid([round(v, 10) for v in values])


def format_grid(values: Sequence[float]) -> str:
    """A grid as :func:`parse_grid` reads it: ``start:stop:count`` when evenly spaced, else a list.

    Example:
        >>> format_grid(parse_grid("-0.5:0.5:21"))
        '-0.5:0.5:21'
        >>> format_grid([-0.1, 0.0, 0.3])
        '-0.1,0,0.3'
    """
    values = [float(v) for v in values]
    if len(values) > 2:
        start, stop, n = values[0], values[-1], len(values)
        even = [round(start + (stop - start) * i / (n - 1), 10) for i in range(n)]
        if even == [round(v, 10) for v in values]:
            return f"{start:.10g}:{stop:.10g}:{n}"
    return ",".join(f"{v:.10g}" for v in values)


def _default_alphas() -> tuple[float, ...]:
    return parse_grid("-0.5:0.5:21")


@dataclass
class LandscapeConfig:
    """Which landscape to compute.

    Args:
        kind: ``"random"`` (random directions), ``"interpolation"`` (towards a finetuned model;
            1D, or 2D paired with a random axis).
        dims: 1 or 2.
        num_directions: random 1D directions K (VISAGE is averaged over them).
        seed: direction k has seed ``seed + k``; the second 2D axis has ``seed + 1``.
        alphas: the grid along the first axis (must contain 0). Interpolation grids may extend
            past 1 to extrapolate.
        betas: the grid along the second axis (2D; default: ``alphas``).
        search: ``"grid"`` sweeps every point; ``"adaptive"`` (1D) measures α = 0 and bisects
            the grid on each side for the first point outside the basin.
        edge_asr: ASR (percent) at or above which a point is outside the basin (paper: 100).
        refine_visage: adaptive search bisects the gaps inside the basin until interpolating
            the unmeasured points can move VISAGE by about this many points at most (0: bisect
            every gap whose two measured ends differ).
        normalization: ``"layer"`` (paper), ``"filter"`` or ``"none"`` for random directions.
        selection: which parameters move (norm layers excluded by default).
        offload: where the copy of θ₀ lives (``"cpu"`` or ``"disk"``).
    """

    kind: Literal["random", "interpolation"] = field(
        default="random",
        metadata={"help": "Random directions, or the interpolation towards a finetuned model."},
    )
    dims: int = field(default=1, metadata={"help": "1 or 2 (a 2D landscape is a full grid)."})
    num_directions: int = field(
        default=3, metadata={"help": "Random 1D directions; VISAGE is averaged over them."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the first random direction."})
    alphas: Sequence[float] = field(
        default_factory=_default_alphas,
        metadata={
            "help": "Grid along the first axis (must contain 0): start:stop:count or a comma "
            "list, written --grid=-0.5:0.5:21."
        },
    )
    betas: Sequence[float] | None = field(
        default=None, metadata={"help": "Grid along the second axis of a 2D landscape."}
    )
    search: Literal["grid", "adaptive"] = field(
        default="adaptive",
        metadata={"help": "Full grid sweep, or adaptive basin-edge bisection (1D only)."},
    )
    edge_asr: float = field(
        default=100.0,
        metadata={"help": "ASR % at or above which a point is outside the basin (paper: 100)."},
    )
    refine_visage: float = field(
        default=1.0,
        metadata={
            "help": "Adaptive search: bisect the gaps inside the basin until interpolating can "
            "move VISAGE by at most this many points."
        },
    )
    normalization: Literal["layer", "filter", "none"] = field(
        default="layer", metadata={"help": "Normalization of random directions (paper: layer)."}
    )
    selection: ParameterSelection = field(
        default_factory=ParameterSelection, metadata={"help": "Which parameters move."}
    )
    offload: Literal["cpu", "disk"] = field(
        default="cpu", metadata={"help": "Where the copy of the original weights lives."}
    )

    def __post_init__(self) -> None:
        if self.kind not in ("random", "interpolation"):
            raise ValueError(f"kind must be 'random' or 'interpolation', got {self.kind!r}.")
        if self.dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {self.dims!r}.")
        if self.search not in ("grid", "adaptive"):
            raise ValueError(f"search must be 'grid' or 'adaptive', got {self.search!r}.")
        if self.search == "adaptive" and self.dims == 2:
            raise ValueError("Adaptive search is 1D only; use search='grid' for a 2D landscape.")
        if self.num_directions < 1:
            raise ValueError("num_directions must be at least 1.")
        if not (math.isfinite(self.refine_visage) and self.refine_visage >= 0):
            raise ValueError(
                f"refine_visage (--refine-visage) must be a finite number >= 0 (VISAGE points), "
                f"got {self.refine_visage}. Use e.g. 1 (the default), or 0 to bisect every gap."
            )
        if not 0 < self.edge_asr <= 100:  # (NaN fails too)
            raise ValueError(
                f"edge_asr (--edge-asr) is a percentage in (0, 100], got {self.edge_asr}."
            )
        if self.offload not in ("cpu", "disk"):
            raise ValueError(f"offload must be 'cpu' or 'disk', got {self.offload!r}.")
        self.alphas = validate_grid(self.alphas, "alphas")
        if self.dims == 2:
            self.betas = validate_grid(
                self.betas if self.betas is not None else self.alphas, "betas"
            )
        if isinstance(self.selection, dict):
            self.selection = ParameterSelection(**self.selection)

    def direction_specs(self) -> list[dict[str, Any]]:
        """The random directions this config draws, as ``to_dict()`` descriptions."""
        if self.kind == "interpolation":
            return (
                [RandomDirection(self.seed, self.normalization).to_dict()] if self.dims == 2 else []
            )
        count = 2 if self.dims == 2 else self.num_directions
        return [RandomDirection(self.seed + k, self.normalization).to_dict() for k in range(count)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["alphas"] = list(self.alphas)
        data["betas"] = list(self.betas) if self.betas is not None else None
        data["selection"] = self.selection.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LandscapeConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
