"""Where a guarded run went, drawn over a 2D landscape spanned by its own finetune direction.

``safety-guard landscape --direction interpolation --target T --dims 2`` measures the ASR on the
plane θ₀ + α·(θ_T − θ₀) + β·v: α = 1 is T (a finetuned model, or a LoRA adapter such as the
guard's ``last-safe`` one), v a random direction. When T is the state of a probe of the run, every
other probed state θ₀ + δₜ lies on that plane at

* α = dₜ·cos(δₜ, δ_T) / d_T: its displacement d (layer-normalized) along T's direction, with the
  cosine from the sketches of δ each probe records (``ProbeRecord.sketch``), and
* β ≈ 0: the component of δₜ along a random direction of n weights is of order dₜ/√n,

and the point θ₀ + s·δₜ a probe measured ahead lies at s·α.

Example:
    >>> import torch
    >>> from safety_guard.guard.displacement import encode_sketch
    >>> records = [
    ...     {"event": "probe", "step": 2, "displacement": 1e-4, "status": "ok",
    ...      "points": {"1": {}, "2": {}}, "sketch": encode_sketch(torch.tensor([1.0, 0.0]))},
    ...     {"event": "probe", "step": 4, "displacement": 2e-4, "status": "halt",
    ...      "points": {"1": {}, "2": {}}, "sketch": encode_sketch(torch.tensor([1.0, 1.0]))},
    ... ]
    >>> [(p["step"], round(p["alpha"], 3)) for p in run_path(records, target_step=4)]
    [(2, 0.354), (4, 1.0)]
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safety_guard.guard.displacement import decode_sketch, sketch_cosine
from safety_guard.landscape import Landscape

__all__ = ["landscape_target_step", "run_path"]


def run_path(records: Sequence[Mapping[str, Any]], target_step: int) -> list[dict[str, Any]]:
    """The probed states of a run as positions along the direction θ₀ → the state of the probe
    at ``target_step``.

    Args:
        records: the run's trajectory lines (``trajectory.jsonl``); probes carry their sketch.
        target_step: the step of the probe whose state is the landscape's α = 1.

    Returns:
        One dict per probe, in step order: ``step``, ``alpha``, ``status``, ``displacement`` and
        ``ahead`` (multiple of δ → α of the point θ₀ + s·δ the probe measured, s > 1).

    Raises:
        ValueError: no probe at ``target_step``, probes without a sketch or a displacement,
            or sketches that cannot be compared.

    Example:
        >>> from safety_guard.guard.trajectory import read_records
        >>> run_path(read_records("out/safety-guard/trajectory.jsonl"), 4)  # doctest: +SKIP
        [{'step': 1, 'alpha': 0.36, ...}, ...]
    """
    probes = [r for r in records if r.get("event") == "probe"]
    target = next((r for r in probes if r["step"] == target_step), None)
    if target is None:
        steps = ", ".join(str(r["step"]) for r in probes) or "none"
        raise ValueError(
            f"The run has no probe at step {target_step} (its probes: {steps}); the landscape's "
            "target must be the state of one of them (e.g. its last-safe adapter), or pass "
            "--target-step."
        )
    missing = [r["step"] for r in probes if not isinstance(r.get("sketch"), str)]
    if missing:
        raise ValueError(
            f"The probes at steps {missing} recorded no sketch of δ (a trajectory written by an "
            "earlier safety-guard): the path cannot be placed. Guard the run again to draw it."
        )
    reference = decode_sketch(target["sketch"])
    d_target = _displacement(target)
    if not d_target > 0:
        raise ValueError(f"The probe at step {target_step} had no displacement to measure along.")
    path = []
    for r in sorted(probes, key=lambda r: r["step"]):
        sketch = decode_sketch(r["sketch"])
        cosine = sketch_cosine(sketch, reference) if sketch.shape == reference.shape else None
        displacement = _displacement(r)
        if cosine is None and displacement > 0:
            raise ValueError(
                f"The sketch of the probe at step {r['step']} cannot be compared with the "
                f"target's (step {target_step}): {sketch.numel()} values against "
                f"{reference.numel()}, or all zero. Is the trajectory from one run?"
            )
        alpha = displacement * (cosine or 0.0) / d_target
        ahead = {float(s): float(s) * alpha for s in (r.get("points") or {}) if float(s) > 1.0}
        path.append(
            {
                "step": r["step"],
                "alpha": alpha,
                "status": r.get("status", "ok"),
                "displacement": displacement,
                "ahead": ahead,
            }
        )
    return path


def _displacement(record: Mapping[str, Any]) -> float:
    value = record.get("displacement")
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"The probe at step {record.get('step')} records no finite displacement.")
    return float(value)


def landscape_target_step(
    landscape: Landscape, landscape_file: str | Path | None = None
) -> int | None:
    """The guard step whose state a 2D interpolation landscape points to: the
    ``safety_guard_step.json`` the guard writes beside a last-safe adapter or model (None when
    the target has none). The target's folder is taken as the landscape recorded it, relative
    to the working directory or else to ``landscape_file``'s folder. (The guard rewrites
    ``last-safe`` at every probe within the promise: compute the landscape from the run's final
    one.)

    Example:
        >>> landscape_target_step(Landscape.load("path.json"), "path.json")  # doctest: +SKIP
        4

    Raises:
        ValueError: the landscape is not a 2D landscape along an interpolation or LoRA direction.
    """
    surface = landscape.data.get("surface") or {}
    directions = surface.get("directions") or []
    first = directions[0] if directions else {}
    target = first.get("adapter") if first.get("kind") == "lora" else first.get("target")
    if not surface.get("points") or first.get("kind") not in ("lora", "interpolation"):
        raise ValueError(
            "A run's path is drawn over a 2D landscape whose first axis is the finetune "
            "direction: safety-guard landscape --direction interpolation --target "
            "RUN/safety-guard/last-safe --dims 2 --output FILE."
        )
    if not target:
        return None
    folders = [Path(str(target))]
    if landscape_file is not None and not folders[0].is_absolute():
        folders.append(Path(landscape_file).parent / folders[0])
    for folder in folders:
        marker = folder / "safety_guard_step.json"
        if marker.is_file():
            return int(json.loads(marker.read_text())["step"])
    return None
