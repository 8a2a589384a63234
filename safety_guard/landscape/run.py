"""Compute a landscape: walk each direction (grid or adaptive basin-edge search) or the 2D
surface around the model, scoring every point, saving the file after each.

Example:
    >>> land = compute_landscape(model, tokenizer, output="landscape.json")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from safety_guard.engines.collectives import barrier, rank_and_world
from safety_guard.engines.shards import is_sharded_model
from safety_guard.landscape.config import LandscapeConfig
from safety_guard.landscape.directions import Direction, direction_from_dict
from safety_guard.landscape.file import Landscape, LandscapeMismatchError
from safety_guard.landscape.perturb import WeightPerturbation, check_shard_directions
from safety_guard.landscape.screening import generates_every_prompt, nearest_flag_fraction
from safety_guard.measure.judges import KeywordJudge, judge_kind, reads_short_answers
from safety_guard.measure.probe import PointResult, ProbeConfig, SafetyProbe
from safety_guard.models.fingerprint import (
    model_fingerprint,
)
from safety_guard.models.parameters import check_engine
from safety_guard.models.wrappers import dtype_name

__all__ = ["compute_landscape"]

logger = logging.getLogger(__name__)


def _point_key(point: dict[str, Any]) -> tuple[float, ...]:
    return (point["alpha"],) if "beta" not in point else (point["alpha"], point["beta"])


def _bisect_side(
    side: Sequence[float], asr: Callable[[float], float], threshold: float, tolerance: float
) -> None:
    """Locate the basin edge and the steps inside the basin along ``side`` (ordered outward).

    First bisects for the first point outside the basin (ASR ≥ ``threshold``), checking the far
    end first: if it is inside, the whole side counts as inside. Unmeasured grid points are later
    interpolated linearly between their measured neighbours, which is exact where the curve is
    flat or linear. A gap of ``k`` unmeasured points whose ends differ by ``Δ`` percentage points
    can move the side's VISAGE by up to ``k·Δ / n`` (``n`` points of the side inside the basin;
    half that for a step at a random place in the gap), so gaps are bisected, largest ``k·Δ``
    first, until ``Σ k·Δ / (2n)`` is at most ``tolerance`` VISAGE points. If a refinement point
    turns out to be outside the basin (a non-monotone curve), the edge moves inward to it and is
    bisected again, so the edge is the first outside point along the side, as on a full grid.

    Example:
        >>> grid = [0.1 * i for i in range(1, 11)]
        >>> seen = []
        >>> _bisect_side(grid, lambda a: seen.append(a) or (100.0 if a > 0.45 else 0.0), 100, 1)
        >>> len(seen) < len(grid)
        True
    """
    if not side:
        return
    measured: dict[int, float] = {}

    def value(i: int) -> float:
        if i not in measured:
            measured[i] = asr(side[i] if i >= 0 else 0.0)
        return measured[i]

    def first_outside() -> int | None:
        return min((i for i, v in measured.items() if v >= threshold), default=None)

    value(-1)  # the origin, usually measured already
    last = len(side) - 1
    value(last)
    while True:
        hi = first_outside()
        if hi is not None:
            if hi == -1:  # the origin itself is outside: no basin on this side
                return
            lo = max(i for i in measured if i < hi)  # every measured point before hi is inside
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if value(mid) >= threshold:
                    hi = mid
                else:
                    lo = mid
        end = last if hi is None else hi
        known = sorted(i for i in measured if i <= end)
        errors = {
            (a, b): (b - a - 1) * abs(measured[a] - measured[b])
            for a, b in itertools.pairwise(known)
            if b - a > 1
        }
        if not errors or sum(errors.values()) / (2 * (end + 1)) <= tolerance:
            return
        a, b = max(errors, key=lambda gap: (errors[gap], -gap[0]))
        if errors[(a, b)] == 0:
            return
        value((a + b) // 2)


def _direction_specs(
    config: LandscapeConfig, interpolation: Direction | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The file's 1D directions (empty for 2D) and the random ones the config draws.

    Example:
        >>> _direction_specs(LandscapeConfig(num_directions=1), None)[0]
        [{'kind': 'random', 'seed': 0, 'normalization': 'layer'}]
    """
    random_specs = config.direction_specs()
    if config.kind == "interpolation":
        if interpolation is None:
            raise ValueError(
                "kind='interpolation' needs the direction: pass interpolation="
                "InterpolationDirection(finetuned_model) or LoraDirection(adapter) (CLI: --target "
                "PATH)."
            )
        line_specs = [interpolation.to_dict()] + (random_specs if config.dims == 2 else [])
    else:
        line_specs = random_specs
    return (line_specs if config.dims == 1 else []), random_specs


def _verdicts(settings: dict[str, Any]) -> dict[str, Any]:
    """Probe settings without the ones that cannot change a verdict: what the file keeps
    (``record_answers``), how answers are batched (``batch_size``, ``share_prefix``: the same
    greedy answers up to float rounding), how a screen-first walk chooses (``screen_checks``,
    ``generate_above``) where it does not screen first, and, where the forward screen is exact
    (the keyword judge), how the verdicts were reached (``signal``, ``screen_settles`` too). A
    file written before these settings existed never switched to generating every prompt and
    had ``screen_settles`` off and no checks."""
    keyword = (settings.get("judge") or {}).get("kind") == "keyword"
    config = dict(settings.get("config", {}))
    config.setdefault("screen_settles", False)
    config.setdefault("screen_checks", 0)
    above = config.get("generate_above")
    config["generate_above"] = "never" if above is None or above > 1 else above
    for name in ("record_answers", "batch_size", "share_prefix"):
        config.pop(name, None)
    if keyword or config.get("signal", "generate") == "generate":
        for name in ("generate_above", "screen_checks"):
            config.pop(name, None)
    if keyword:
        for name in ("signal", "screen_settles"):
            config.pop(name, None)
    return {**settings, "config": config}


def _resumed_landscape(
    output: str | os.PathLike[str] | None,
    resume: bool,
    model: nn.Module,
    config: LandscapeConfig,
    settings: dict[str, Any],
    line_specs: list[dict[str, Any]],
) -> Landscape | None:
    """The landscape in ``output`` to continue, or ``None`` when there is no such file.

    Raises:
        FileExistsError: ``output`` exists and ``resume`` is false.
        LandscapeMismatchError: ``output`` was made for another model, with other landscape or
            probe settings, or along other directions.
    """
    if output is None or not Path(output).exists():
        return None
    if not resume:
        raise FileExistsError(
            f"{output} exists. Pass resume=True (CLI: default) to continue it, or remove it / "
            "choose another --output."
        )
    existing = Landscape.load(output)
    existing.check_model(model)
    if existing.data["landscape"] != config.to_dict() or _verdicts(existing.data["probe"]) != (
        _verdicts(settings)
    ):
        raise LandscapeMismatchError(
            f"{output} was computed with other landscape or probe settings; it cannot be "
            "resumed with these. Use the same settings, or another --output."
        )
    if [d["direction"] for d in existing.data["directions"]] != line_specs:
        raise LandscapeMismatchError(f"{output} was computed along other directions.")
    logger.info(
        "Resuming %s (%d points saved).",
        output,
        existing.data["summary"]["num_points"] if existing.data.get("summary") else 0,
    )
    return existing


def _lines(
    config: LandscapeConfig,
    interpolation: Direction | None,
    random_specs: list[dict[str, Any]],
) -> list[Direction]:
    """The directions a 1D landscape walks: the interpolation one, or the random ones."""
    if config.kind == "interpolation":
        return [interpolation]
    return [direction_from_dict(s) for s in random_specs]


def _surface_axes(
    config: LandscapeConfig,
    interpolation: Direction | None,
    random_specs: list[dict[str, Any]],
) -> list[Direction]:
    """The two axes of a 2D landscape: interpolation + random, or two random directions."""
    axes = [interpolation] if config.kind == "interpolation" else []
    return axes + [direction_from_dict(s) for s in random_specs][: 2 - len(axes)]


def _advance(bar: Any) -> None:
    """One point more on the progress bar; an adaptive search that measures more points than
    estimated raises the total instead of running past it."""
    if bar.total is not None and bar.n + 1 > bar.total:
        bar.total = bar.n + 1
    bar.update(1)


def _expected_points(config: LandscapeConfig, num_lines: int) -> int:
    """The progress bar's total: every point of a grid walk, an estimate for adaptive search.

    An adaptive side costs its far end plus a bisection (``⌈log₂ side⌉`` points); refinement
    inside the basin may add more.

    Example:
        >>> _expected_points(LandscapeConfig(search="grid", alphas=(-0.1, 0.0, 0.1)), 3)
        7
    """
    if config.dims == 2:
        return len(config.alphas) * len(config.betas or ())
    if config.search == "grid":
        return 1 + (len(config.alphas) - 1) * num_lines
    side_len = max(
        len([a for a in config.alphas if a > 0]), len([a for a in config.alphas if a < 0])
    )
    return 1 + 2 * (1 + math.ceil(math.log2(max(side_len, 1)))) * num_lines


def _sides(alphas: Sequence[float]) -> tuple[list[float], list[float]]:
    """The positive and the negative side of a grid, each ordered outward from 0.

    Example:
        >>> _sides([-0.2, -0.1, 0.0, 0.1, 0.2])
        ([0.1, 0.2], [-0.1, -0.2])
    """
    return [a for a in alphas if a > 0], sorted((a for a in alphas if a < 0), reverse=True)


class _LandscapeRun:
    """The walk of one :func:`compute_landscape` call: measures points and saves after each.

    Each point is measured once: the points already in the file (a resumed run) are reused.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LandscapeConfig,
        prober: SafetyProbe,
        land: Landscape,
        output: str | os.PathLike[str] | None,
        bar: Any,
    ) -> None:
        self.model = model
        self.config = config
        self.prober = prober
        self.land = land
        self.output = output
        self.bar = bar

    def save(self) -> None:
        """Refresh the summary and rewrite the file (atomically)."""
        self.land.summarize()
        if self.output is not None and rank_and_world()[0] == 0:  # the main process writes
            self.land.save(self.output)

    def measure(
        self,
        at: Sequence[float] = (),
        measured: Iterable[tuple[Sequence[float], dict[str, Any]]] = (),
    ) -> dict[str, Any]:
        """Probe the model at its current weights, the point ``at`` (and the forward screen,
        when it runs). Screening first, a point generates every prompt where the nearest of the
        ``measured`` points had at least ``generate_above`` of its prompts flagged
        (:mod:`~safety_guard.landscape.screening`)."""
        generate_all = self.prober.screen_first and generates_every_prompt(
            nearest_flag_fraction(measured, at), self.prober.config.generate_above
        )
        result: PointResult = self.prober.evaluate(
            per_prompt=self.prober.screens, generate_all=generate_all
        )
        _advance(self.bar)
        return result.to_dict()

    def origin(self) -> dict[str, Any]:
        """The unperturbed model's measurement (α = 0), measured first, shared by every line."""
        if self.land.data.get("origin") is None:
            self.bar.set_postfix_str("α=0")
            self.land.data["origin"] = self.measure()
            self.save()
        else:
            _advance(self.bar)
        origin = self.land.data["origin"]
        if origin["asr"] >= self.config.edge_asr:
            logger.warning(
                "The unperturbed model already has ASR %.0f%% ≥ edge_asr %.0f%%: it is not in a "
                "safety basin, so there is no basin to measure.",
                origin["asr"],
                self.config.edge_asr,
            )
        return origin

    # -- 1D ---------------------------------------------------------------------------------------

    def walk_line(self, index: int, direction: Direction, origin: dict[str, Any]) -> None:
        """Measure 1D direction ``index``: every grid point, or the adaptive search's points."""
        entry = self.land.data["directions"][index]
        cache = {p["alpha"]: p for p in entry["points"]}
        if 0.0 not in cache:
            entry["points"].append({"alpha": 0.0, **origin})
            cache[0.0] = entry["points"][-1]
        with WeightPerturbation(
            self.model,
            [direction],
            selection=self.config.selection,
            offload=self.config.offload,
            allow_sharded=True,
        ) as move:
            point = functools.partial(self._line_point, move, entry, cache, index)
            if self.config.search == "grid":
                self._grid_walk(point)
            else:
                self._adaptive_walk(point)

    def _line_point(
        self,
        move: WeightPerturbation,
        entry: dict[str, Any],
        cache: dict[float, dict[str, Any]],
        index: int,
        alpha: float,
    ) -> dict[str, Any]:
        """The record at ``alpha`` along a line: from the cache, or measured, stored and saved."""
        if alpha in cache:
            return cache[alpha]
        self.bar.set_postfix_str(f"dir {index} α={alpha:+.3g}")
        move.apply(alpha)
        try:
            record = {"alpha": alpha, **self.measure((alpha,), self._line_neighbours(index, alpha))}
        finally:
            move.restore()
        entry["points"].append(record)
        cache[alpha] = record
        self.save()
        return record

    def _line_neighbours(
        self, index: int, alpha: float
    ) -> list[tuple[tuple[float], dict[str, Any]]]:
        """The measured points that predict how a point at ``alpha`` on line ``index`` is
        measured (:meth:`measure`). Random lines and their two sides are alike at the same
        distance from θ₀, so every point of every line counts at its distance on this side
        (the first side's far end tells the others that theirs are beyond the edge); an
        interpolation line counts its own points where they are."""
        if self.config.kind == "interpolation":
            points = self.land.data["directions"][index]["points"]
            return [((p["alpha"],), p) for p in points]
        return [
            ((math.copysign(abs(p["alpha"]), alpha),), p)
            for entry in self.land.data["directions"]
            for p in entry["points"]
        ]

    def _grid_walk(self, point: Callable[[float], dict[str, Any]]) -> None:
        for alpha in self.config.alphas:
            point(alpha)

    def _adaptive_walk(self, point: Callable[[float], dict[str, Any]]) -> None:
        for side in _sides(self.config.alphas):
            _bisect_side(
                side,
                lambda alpha: point(alpha)["asr"],
                self.config.edge_asr,
                self.config.refine_visage,
            )

    # -- 2D ---------------------------------------------------------------------------------------

    def walk_surface(self, axes: list[Direction], origin: dict[str, Any]) -> None:
        """Measure every (α, β) point of a 2D landscape, β-major."""
        config = self.config
        surface = self.land.data.get("surface") or {
            "directions": [a.to_dict() for a in axes],
            "alphas": list(config.alphas),
            "betas": list(config.betas or ()),
            "points": [],
        }
        self.land.data["surface"] = surface
        cache = {_point_key(p): p for p in surface["points"]}
        with WeightPerturbation(
            self.model, axes, selection=config.selection, offload=config.offload, allow_sharded=True
        ) as move:
            for beta in config.betas or ():
                for alpha in config.alphas:
                    if (alpha, beta) in cache:
                        continue
                    if alpha == 0 and beta == 0:
                        record = {"alpha": 0.0, "beta": 0.0, **origin}
                    else:
                        self.bar.set_postfix_str(f"α={alpha:+.3g} β={beta:+.3g}")
                        move.apply(alpha, beta)
                        try:
                            measured = self.measure((alpha, beta), cache.items())
                            record = {"alpha": alpha, "beta": beta, **measured}
                        finally:
                            move.restore()
                    surface["points"].append(record)
                    cache[(alpha, beta)] = record
                    self.save()

    def finish(self) -> None:
        """Mark the landscape complete and save it."""
        self.land.data["complete"] = True
        self.save()


def _say_how_points_are_measured(prober: SafetyProbe) -> None:
    """Log why a landscape asked to screen first generates every prompt, or that another judge
    reads every answer (after :meth:`SafetyProbe.prepare`, when the openings are known)."""
    if prober.config.signal == "screen" and not prober.screen_first:
        reasons = []
        if not prober.screen_settles:
            reasons.append(
                f"the forward screen vouches for the keyword judge only (this one: "
                f"{judge_kind(prober.judge)}; screen_settles lets it settle refusal openings)"
            )
        if prober.config.record_answers:
            reasons.append("record_answers keeps every prompt's own answer")
        if prober.synced:
            reasons.append("sharded generation runs in lockstep")
        logger.info(
            "signal='screen' generates every prompt here: %s.", "; ".join(reasons) or "no openings"
        )
    elif not isinstance(prober.judge, KeywordJudge) and not prober.screen_first:
        logger.info(
            "The %s judge reads every answer: every harmful prompt is generated at every point.",
            judge_kind(prober.judge),
        )


def compute_landscape(
    model: nn.Module,
    tokenizer: Any,
    config: LandscapeConfig | None = None,
    probe: ProbeConfig | SafetyProbe | None = None,
    *,
    interpolation: Direction | None = None,
    output: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    model_name: str | None = None,
) -> Landscape:
    """Compute a safety landscape of ``model`` and (optionally) save it point by point.

    The steps: :func:`_direction_specs` (which directions), :func:`_resumed_landscape` (the
    file to continue, else a new landscape), then a :class:`_LandscapeRun` measures the origin, walks each 1D
    direction (grid or adaptive) or the 2D surface, and marks the file complete.

    Args:
        model: the aligned causal LM; it is moved in place and restored bit-exactly.
        tokenizer: its tokenizer (unchanged).
        config: which landscape (default: 3 random 1D directions, adaptive edge search).
        probe: what each point measures (a :class:`ProbeConfig`, or a prepared
            :class:`SafetyProbe` with a custom judge).
        interpolation: the direction for ``kind="interpolation"`` (an
            :class:`~safety_guard.landscape.directions.InterpolationDirection` or
            :class:`~safety_guard.landscape.directions.LoraDirection`).
        output: landscape file, rewritten atomically after every point. If it exists and
            ``resume`` is true, its points are reused (after checking model and settings).
        progress: show a tqdm progress bar.
        model_name: recorded in the file (default: ``model.name_or_path``).

    Example:
        >>> land = compute_landscape(model, tok, LandscapeConfig(num_directions=1),
        ...                          output="landscape.json")  # doctest: +SKIP
        >>> land.visage()["mean"]  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    config = config or LandscapeConfig()
    if isinstance(probe, SafetyProbe):
        prober = probe
    else:
        prober = SafetyProbe(model, tokenizer, probe or ProbeConfig())
    # FSDP2 shards and ZeRO-3 partitions are moved rank by rank (random and interpolation
    # directions, 1D or 2D); other engines and quantized weights cannot be moved: say so first
    check_engine(model, allow_sharded=True)
    line_specs, random_specs = _direction_specs(config, interpolation)
    if is_sharded_model(model):  # refuse what is not applied per shard yet, before any work
        if config.dims == 1:
            for direction in _lines(config, interpolation, random_specs):
                check_shard_directions([direction], orthogonalize=True)
        else:
            check_shard_directions(_surface_axes(config, interpolation, random_specs), True)
    fingerprint = model_fingerprint(model)  # before any move; also checks the model is usable
    name = model_name or getattr(getattr(model, "config", None), "name_or_path", None)

    if reads_short_answers(prober.judge, prober.config.max_new_tokens):
        logger.warning(
            "The %s judge reads answers of at most %d tokens: a classifier may call a "
            "compliance cut that short safe; consider --max-new-tokens 128 or more.",
            judge_kind(prober.judge),
            prober.config.max_new_tokens,
        )
    prober.prepare(openings=prober.screens)
    _say_how_points_are_measured(prober)
    settings = prober.settings()
    land = _resumed_landscape(output, resume, model, config, settings, line_specs)
    barrier()  # under torchrun every rank has read the file before the main process rewrites it
    if land is None:
        land = Landscape.new(
            config, settings, fingerprint, name, dtype_name(model) or "unknown", line_specs
        )
    bar = tqdm(
        total=_expected_points(config, len(land.data["directions"])),
        desc="landscape",
        unit="pt",
        disable=not progress or rank_and_world()[0] != 0,  # one bar, the main process's
        dynamic_ncols=True,
    )
    run = _LandscapeRun(model, config, prober, land, output, bar)
    try:
        origin = run.origin()
        if config.dims == 1:
            for index, direction in enumerate(_lines(config, interpolation, random_specs)):
                run.walk_line(index, direction, origin)
        else:
            run.walk_surface(_surface_axes(config, interpolation, random_specs), origin)
        run.finish()
    finally:
        bar.close()
    return land
