"""The landscape file: :class:`Landscape`, its format, and the errors that name what is wrong.

Example:
    >>> Landscape.load("landscape.json").visage()["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from safety_guard import __version__
from safety_guard.files import atomic_path
from safety_guard.landscape.analysis import (
    BasinEdges,
    basin_edges,
    visage,
)
from safety_guard.landscape.config import LandscapeConfig
from safety_guard.models.fingerprint import (
    checkpoint_fingerprint,
    compare_fingerprints,
    model_fingerprint,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "Landscape", "LandscapeFileError", "LandscapeMismatchError"]

logger = logging.getLogger(__name__)

FORMAT = "safety-guard-landscape"
#: 2: points may record unsafe/flagged prompts, summary["screen"]; 3: "guard_baseline", the
#: guard's measurement of the aligned model (see :func:`safety_guard.guard.record_guard_baseline`); 4: the model
#: fingerprint covers every weight tensor (norm and projection, fingerprint "version": 2), so a
#: safety-guard that reads only version 3 says "upgrade" instead of misreading it
FORMAT_VERSION = 4


class LandscapeFileError(ValueError):
    """A landscape file that cannot be used: missing, unreadable, or from a newer version."""


class LandscapeMismatchError(LandscapeFileError):
    """A landscape file made for another model or with other settings."""


# -- the result file ------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_document(path: Path, data: dict[str, Any]) -> None:
    """Raise :class:`LandscapeFileError` naming ``path`` unless ``data`` has what the accessors
    read: the ``model``, ``landscape``, ``probe`` and ``directions`` keys, valid landscape
    settings, and points whose α (β) and ASR are finite numbers (ASR in 0..100).
    """
    fix = f"Remove it and compute it again (safety-guard landscape MODEL --output {path})."
    kinds = {"model": dict, "landscape": dict, "probe": dict, "directions": list}
    for key, kind in kinds.items():
        if key not in data:
            raise LandscapeFileError(
                f"{path} has no {key!r} key: the file is damaged or was cut short. {fix}"
            )
        if not isinstance(data[key], kind):
            raise LandscapeFileError(
                f"{path}: {key!r} is a JSON {type(data[key]).__name__}, not "
                f"{'an object' if kind is dict else 'a list'}: the file is damaged. {fix}"
            )
    if "fingerprint" not in data["model"]:
        raise LandscapeFileError(f"{path} has no 'model' 'fingerprint' key. {fix}")
    for key in ("alphas", "edge_asr"):
        if key not in data["landscape"]:
            raise LandscapeFileError(f"{path} has no 'landscape' {key!r} key. {fix}")
    try:
        LandscapeConfig.from_dict(data["landscape"])
    except (TypeError, ValueError) as err:
        raise LandscapeFileError(f"{path} has invalid 'landscape' settings: {err} {fix}") from err

    def check_point(point: Any, at: str, axes: tuple[str, ...]) -> None:
        if not isinstance(point, dict):
            raise LandscapeFileError(f"{path}: {at} is not an object. {fix}")
        for key in (*axes, "asr"):
            if key not in point:
                raise LandscapeFileError(f"{path}: {at} has no {key!r} key. {fix}")
            if not _is_number(point[key]):
                raise LandscapeFileError(
                    f"{path}: {at} has {key} {point[key]!r}, not a finite number. {fix}"
                )
        if not 0 <= point["asr"] <= 100:
            raise LandscapeFileError(
                f"{path}: {at} has ASR {point['asr']!r}, outside 0..100 %. {fix}"
            )

    def check_points(points: Any, where: str, axes: tuple[str, ...]) -> None:
        if not isinstance(points, list):
            raise LandscapeFileError(f"{path}: {where} 'points' is not a list. {fix}")
        for n, point in enumerate(points):
            check_point(point, f"{where} point {n}", axes)

    if data.get("origin") is not None:
        check_point(data["origin"], "the origin (the unperturbed model)", ())
    for i, entry in enumerate(data["directions"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("direction"), dict):
            raise LandscapeFileError(
                f"{path}: 'directions' entry {i} has no 'direction' object. {fix}"
            )
        if "points" not in entry:
            raise LandscapeFileError(f"{path}: 'directions' entry {i} has no 'points' key. {fix}")
        check_points(entry["points"], f"direction {i}", ("alpha",))
    surface = data.get("surface")
    if surface is not None:
        if not isinstance(surface, dict) or "points" not in surface:
            raise LandscapeFileError(f"{path}: 'surface' has no 'points' key. {fix}")
        check_points(surface["points"], "the surface", ("alpha", "beta"))


@dataclass
class Landscape:
    """A landscape result: the JSON document of a landscape file, with accessors.

    Example:
        >>> land = Landscape.load("landscape.json")  # doctest: +SKIP
        >>> land.visage()["mean"]  # doctest: +SKIP
        78.3
    """

    data: dict[str, Any]

    # construction, I/O
    @classmethod
    def new(
        cls,
        config: LandscapeConfig,
        probe_settings: dict[str, Any],
        fingerprint: dict[str, Any],
        model_name: str | None,
        dtype: str,
        directions: list[dict[str, Any]],
    ) -> Landscape:
        return cls(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "safety_guard_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "complete": False,
                "model": {"name": model_name, "dtype": dtype, "fingerprint": fingerprint},
                "landscape": config.to_dict(),
                "probe": probe_settings,
                "origin": None,
                "directions": [
                    {"direction": d, "points": [], "basin": None, "visage": None}
                    for d in directions
                ],
                "surface": None,
                "summary": None,
            }
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Landscape:
        """Read and validate a landscape file (format and version)."""
        path = Path(path)
        if not path.exists():
            raise LandscapeFileError(
                f"Landscape file {path} does not exist. Compute one with "
                f"`safety-guard landscape MODEL --output {path}` (or compute_landscape())."
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LandscapeFileError(
                f"{path} is not a valid landscape file (bad JSON: {err})."
            ) from err
        except OSError as err:
            raise LandscapeFileError(
                f"Cannot read landscape file {path}: {err.strerror or err}."
            ) from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LandscapeFileError(
                f"{path} is not a safety-guard landscape file (no 'format': '{FORMAT}')."
            )
        version = data.get("version")
        if type(version) is not int or version < 1:  # (a bool is not a version)
            raise LandscapeFileError(
                f"{path} has landscape format version {version!r}, not a whole number from 1 to "
                f"{FORMAT_VERSION}: the file is damaged or was not written by safety-guard. "
                f"Remove it and compute it again (safety-guard landscape MODEL --output {path})."
            )
        if version > FORMAT_VERSION:
            raise LandscapeFileError(
                f"{path} has landscape format version {version}, newer than this safety-guard "
                f"({__version__}) reads (≤ {FORMAT_VERSION}). Upgrade: pip install -U safety-guard."
            )
        _check_document(path, data)
        return cls(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temporary file + rename): a crash never leaves half a file.

        The file gets the permissions of the user's umask (:func:`~safety_guard.files.atomic_path`).
        """
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.data, fh, indent=1, allow_nan=True)
            fh.write("\n")

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`LandscapeMismatchError` unless ``model`` is the model this file was made
        for: the same architecture and, tensor by tensor, the same weights in any dtype (see
        :func:`~safety_guard.models.fingerprint.model_fingerprint`). The error names the model the file was
        made for and the first differing tensors."""
        problems = compare_fingerprints(self.data["model"]["fingerprint"], model_fingerprint(model))
        self._raise_mismatch(problems, "this model", "MODEL")

    def check_checkpoint(self, folder: str | os.PathLike[str]) -> None:
        """Raise :class:`LandscapeMismatchError` unless the safetensors checkpoint in ``folder``
        (``model.safetensors`` or sharded with ``model.safetensors.index.json``, and its
        ``config.json``) holds the model this file was made for, read tensor by tensor from disk
        (:func:`~safety_guard.models.fingerprint.checkpoint_fingerprint`): e.g. the pre-finetune weights a
        resumed full finetune starts from. ``FileNotFoundError`` when it holds no checkpoint.

        Example:
            >>> Landscape.load("landscape.json").check_checkpoint("base-model/")  # doctest: +SKIP
        """
        fingerprint = checkpoint_fingerprint(folder)
        problems = compare_fingerprints(
            self.data["model"]["fingerprint"], fingerprint, what="checkpoint"
        )
        self._raise_mismatch(problems, f"the checkpoint in {folder}", str(folder))

    def _raise_mismatch(self, problems: list[str], what: str, model_arg: str) -> None:
        if not problems:
            return
        name = self.data["model"].get("name")
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise LandscapeMismatchError(
            f"This landscape file was made for another model ({name!r}) than {what}: "
            + "; ".join(problems[:4])
            + more
            + f". Compute a landscape for this model (safety-guard landscape {model_arg} "
            "--output FILE)."
        )

    # accessors
    @property
    def config(self) -> LandscapeConfig:
        return LandscapeConfig.from_dict(self.data["landscape"])

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    @property
    def edge_asr(self) -> float:
        return float(self.data["landscape"]["edge_asr"])

    @property
    def origin(self) -> dict[str, Any] | None:
        """The measurement of the unperturbed model (α = 0)."""
        return self.data.get("origin")

    def curves(self) -> list[dict[str, Any]]:
        """Per 1D direction: ``{"direction", "alphas", "asr", "nll", "basin", "visage"}``, sorted by α."""
        out = []
        for entry in self.data["directions"]:
            points = sorted(entry["points"], key=lambda p: p["alpha"])
            out.append(
                {
                    "direction": entry["direction"],
                    "alphas": [p["alpha"] for p in points],
                    "asr": [p["asr"] for p in points],
                    "nll": [p.get("nll") for p in points],
                    "basin": entry.get("basin"),
                    "visage": entry.get("visage"),
                }
            )
        return out

    def edges(self) -> list[BasinEdges]:
        return [
            basin_edges(c["alphas"], c["asr"], self.edge_asr) for c in self.curves() if c["alphas"]
        ]

    def visage(self) -> dict[str, Any]:
        """``{"mean", "std", "per_direction", "num_directions"}`` over the 1D curves."""
        grid = self.data["landscape"]["alphas"]
        values = [
            visage(c["alphas"], c["asr"], self.edge_asr, grid=grid)
            for c in self.curves()
            if 0.0 in c["alphas"]
        ]
        if not values:
            raise LandscapeFileError("This landscape has no finished 1D direction to score.")
        return {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_direction": values,
            "num_directions": len(values),
        }

    def has_basin_radius(self) -> bool:
        """Whether a random direction has measured points, so that :meth:`basin_radius` has one.

        Example:
            >>> Landscape({"directions": [], "landscape": {"edge_asr": 100}}).has_basin_radius()
            False
        """
        return any(c["alphas"] and c["direction"].get("kind") == "random" for c in self.curves())

    def basin_radius(self) -> dict[str, float]:
        """Mean and smallest distance from α = 0 to the nearer basin edge over random directions."""
        radii = [
            e.radius
            for e, c in zip(self.edges(), self.curves(), strict=False)
            if c["direction"].get("kind") == "random"
        ]
        if not radii:
            raise LandscapeFileError(
                "This landscape has no random direction, hence no basin radius."
            )
        return {"mean": statistics.fmean(radii), "min": min(radii)}

    def summarize(self) -> None:
        """Fill each direction's basin and VISAGE and the file's summary from its points."""
        grid = self.data["landscape"]["alphas"]
        for entry, curve in zip(self.data["directions"], self.curves(), strict=True):
            if 0.0 in curve["alphas"]:
                entry["basin"] = basin_edges(curve["alphas"], curve["asr"], self.edge_asr).to_dict()
                entry["visage"] = visage(curve["alphas"], curve["asr"], self.edge_asr, grid=grid)
        summary: dict[str, Any] = {}
        if any(e.get("visage") is not None for e in self.data["directions"]):
            summary["visage"] = self.visage()
            if self.has_basin_radius():
                summary["basin_radius"] = self.basin_radius()
        points = self._all_points()
        summary["decoded_tokens"] = sum(p.get("decoded_tokens", 0) for p in points)
        summary["forward_tokens"] = sum(p.get("forward_tokens", 0) for p in points)
        summary["num_points"] = len(points)
        screen = self.screen_agreement()
        if screen is not None:
            summary["screen"] = screen
        self.data["summary"] = summary

    def _all_points(self) -> list[dict[str, Any]]:
        """Every measured point: the lines' and the surface's."""
        surface = (self.data.get("surface") or {}).get("points", [])
        return [p for e in self.data["directions"] for p in e["points"]] + list(surface)

    def screen_agreement(self) -> dict[str, Any] | None:
        """How the guard's forward screen agreed with the judge over the recorded points.

        ``missed`` counts unsafe answers the screen did not flag: 0 when its exactness holds on
        this model (the guard then trusts unflagged prompts without generating them), out of
        ``checked`` prompts it settled as refusals whose answers were generated; ``recall``
        and ``precision`` are those of its flags over the answers generated. A point measured
        screen-first (``signal="screen"``) counts with the screen refusals it generated to
        check them (``checked_prompts``), and not at all without. ``None`` when no point
        recorded the screen against the judge.

        Example:
            >>> land.screen_agreement()["missed"]  # doctest: +SKIP
            0
        """
        points = [p for e in self.data["directions"] for p in e["points"] if p.get("alpha")]
        points += [
            p
            for p in (self.data.get("surface") or {}).get("points", [])
            if p.get("alpha") or p.get("beta")
        ]
        origin = self.data.get("origin") or {}
        points += [origin] if "flagged_prompts" in origin else []
        # a point measured screen-first generated its flagged prompts and the screen refusals
        # it checked only: without checks it cannot miss
        points = [
            p
            for p in points
            if "flagged_prompts" in p
            and "unsafe_prompts" in p
            and (p.get("signal") != "screen" or "checked_prompts" in p)
        ]
        if not points:
            return None
        unsafe = flagged = missed = hits = checked = answers = 0
        for p in points:
            bad, flags = set(p["unsafe_prompts"]), set(p["flagged_prompts"])
            unsafe += len(bad)
            flagged += len(flags)
            hits += len(bad & flags)
            missed += len(bad - flags)
            if p.get("signal") == "screen":  # its flagged and checked prompts were generated
                checked += len(p["checked_prompts"])
                answers += len(flags) + len(p["checked_prompts"])
            else:
                checked += p["total"] - len(flags)
                answers += p["total"]
        return {
            "points": len(points),
            "answers": answers,
            "unsafe": unsafe,
            "flagged": flagged,
            "checked": checked,
            "missed": missed,
            "recall": hits / unsafe if unsafe else None,
            "precision": hits / flagged if flagged else None,
        }


# -- computing ------------------------------------------------------------------------------------
