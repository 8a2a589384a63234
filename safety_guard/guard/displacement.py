"""How far a finetune has moved, and moving the model along its own finetuning direction.

Two kinds of finetune, one interface (:class:`FullFinetuneTracker`, :class:`LoraTracker`):

* ``displacement(model)`` — the layer-normalized size of δ = θₜ − θ₀: the root mean square over
  the landscape's tensors of ‖δₜ‖/‖θ₀ₜ‖. A move by α along a layer-normalized random direction
  has displacement α, so this compares directly with the random basin radius.
* ``along(model, s)`` — a context manager that puts the model at θ₀ + s·δ and restores θₜ
  exactly on exit.
* ``sketch(model)`` — a cheap sketch of the layer-normalized δ: its values at ``SKETCH_SIZE``
  fixed coordinates of every tensor (drawn per (seed, name)), scaled so that the sketch's squared
  norm estimates the sum over tensors of (‖δₜ‖/‖θ₀ₜ‖)². :func:`sketch_cosine` compares the
  direction of two sketches and :func:`sketch_displacement` estimates the displacement, so the
  guard can follow δ at every step for the cost of a gather.

For LoRA both are computed from the adapter factors: ‖scale·B A‖²_F = scale²·Σ (BᵀB) ∘ (A Aᵀ)
needs only r×r products, and θ₀ + s·δ is the adapter with its scaling multiplied by s — no base
weight is copied or merged. For full finetuning θ₀ is kept on the CPU in its own dtype.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> tracker = FullFinetuneTracker.from_model(model)
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(1.01)
    >>> round(tracker.displacement(model), 4)  # weight moved 1 %, bias not at all: rms(0.01, 0)
    0.0071
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from safety_guard.engines.collectives import all_reduce_sum
from safety_guard.engines.shards import (
    LocalShard,
    full_tensor,
    is_sharded,
    local_shard,
    reshard,
    sharded_norms,
    squared_distance,
    values_at,
)
from safety_guard.landscape.directions import name_seed
from safety_guard.landscape.perturb import WeightPerturbation
from safety_guard.models.adapters import is_lora
from safety_guard.models.parameters import (
    ParameterSelection,
    canonical_name,
    perturbable_parameters,
    unwrap_model,
)
from safety_guard.models.quantized import dense_shape, dense_weight

__all__ = [
    "SKETCH_SIZE",
    "FullFinetuneTracker",
    "LoraTracker",
    "decode_sketch",
    "encode_sketch",
    "make_tracker",
    "sketch_cosine",
    "sketch_displacement",
]

#: Coordinates sampled per tensor for the sketch of δ (a few thousand numbers for a whole model).
SKETCH_SIZE = 32
_SKETCH_SEED = 20_24


def _sketch_index(name: str, numel: int) -> torch.Tensor:
    """``SKETCH_SIZE`` flat indices into a tensor of ``numel`` elements, fixed per name."""
    generator = torch.Generator().manual_seed(name_seed(_SKETCH_SEED, name))
    return torch.randint(0, numel, (min(SKETCH_SIZE, numel),), generator=generator)


def _concat(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(parts.values())) if parts else torch.zeros(0, dtype=torch.float64)


def sketch_cosine(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """Cosine between two sketches of δ (``None`` when either is missing or zero).

    Example:
        >>> sketch_cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
        0.7071067811865475
    """
    if a is None or b is None or len(a) != len(b):
        return None
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    denom = float(a.norm() * b.norm())
    if denom == 0 or not math.isfinite(denom):
        return None
    return float(a @ b) / denom


def encode_sketch(sketch: torch.Tensor) -> str:
    """A sketch as text for a trajectory line: its float32 bytes (little-endian), base64.

    Example:
        >>> decode_sketch(encode_sketch(torch.tensor([0.5, -2.0], dtype=torch.float64))).tolist()
        [0.5, -2.0]
    """
    data = sketch.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4")
    return base64.b64encode(data.tobytes()).decode("ascii")


def decode_sketch(text: str) -> torch.Tensor:
    """A sketch written by :func:`encode_sketch`, as float64.

    Example:
        >>> decode_sketch("AACAPw==").tolist()
        [1.0]
    """
    if not isinstance(text, str):
        raise ValueError(f"A sketch is base64 text of float32 values, got {type(text).__name__}.")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as err:  # binascii.Error is a ValueError
        raise ValueError(f"A sketch is base64 text of float32 values: {err}") from err
    if len(raw) % 4:
        raise ValueError(f"A sketch is base64 text of float32 values: got {len(raw)} bytes.")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float64))


def sketch_displacement(sketch: torch.Tensor, num_tensors: int) -> float:
    """The displacement estimated from a sketch: √(Σ sketch² / number of tensors).

    Example:
        >>> round(sketch_displacement(torch.tensor([0.03, 0.04]), 1), 6)
        0.05
    """
    return math.sqrt(
        float((torch.as_tensor(sketch, dtype=torch.float64) ** 2).sum()) / max(num_tensors, 1)
    )


class _OriginDirection:
    """δ = θₜ − θ₀ as a direction (θₜ is the origin of the perturbation: the current weights).

    Elementwise: a shard's slice is computed from that shard of θₜ and of θ₀ alone.
    """

    elementwise = True

    def __init__(self, origin: dict[str, torch.Tensor]) -> None:
        self.origin = origin

    def tensor(self, name: str, current: torch.Tensor) -> torch.Tensor | None:
        ref = self.origin.get(name)
        if ref is None:
            return None
        return current.float() - ref.to(current.device, torch.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "finetune"}


class FullFinetuneTracker:
    """θ₀ of a full finetune, kept on the CPU in its own dtype — under FSDP2 each rank keeps the
    θ₀ of its own shard only and sums its partial norms and sketch values with the other ranks
    (:mod:`safety_guard.engines.shards`), so every rank reads the same numbers."""

    kind = "full"

    def __init__(
        self,
        origin: dict[str, torch.Tensor],
        selection: ParameterSelection | None = None,
        layout: dict[str, tuple[int, int]] | None = None,
    ):
        """``origin``: canonical name → θ₀ (this rank's shard of it under FSDP2); ``layout``:
        name → (flat offset of the shard, elements of the full tensor), ``None`` when nothing
        is sharded."""
        self.origin = origin
        self.selection = selection or ParameterSelection()
        self.sharded = layout is not None
        self.layout = layout or {name: (0, t.numel()) for name, t in origin.items()}
        shards = [self._shard(name, t) for name, t in origin.items()]
        self.norms = dict(zip(origin, sharded_norms(shards, self.sharded), strict=True))
        self._sketch_index = {
            name: _sketch_index(name, self.layout[name][1]) for name in origin if self.norms[name]
        }
        self._sketch_origin = {
            name: values_at(self._shard(name, origin[name]), idx)
            for name, idx in self._sketch_index.items()
        }

    def _shard(self, name: str, tensor: torch.Tensor) -> LocalShard:
        offset, numel = self.layout[name]
        return LocalShard(tensor, offset, numel, torch.Size([numel]), self.sharded)

    @property
    def num_tensors(self) -> int:
        """Tensors the displacement averages over."""
        return len(self.origin)

    def sketch(self, model: nn.Module) -> torch.Tensor:
        """δ at the sketch coordinates of every tensor, layer-normalized (float64, CPU)."""
        return _concat(self.sketch_parts(model))

    @torch.no_grad()
    def sketch_parts(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The sketch, tensor by tensor (canonical name → its sampled, scaled δ values)."""
        parts = {}
        for name, param in perturbable_parameters(model, self.selection, allow_sharded=True):
            idx = self._sketch_index.get(name)
            if idx is None:
                continue
            values, held = values_at(self._shard(name, local_shard(param).tensor), idx)
            origin, _ = self._sketch_origin[name]
            numel = self.layout[name][1]
            scale = math.sqrt(numel / len(idx)) / self.norms[name]
            parts[name] = torch.where(held, values - origin, 0.0) * scale
        if self.sharded and parts:  # each rank holds its coordinates: sum the partial sketches
            flat = all_reduce_sum(_concat(parts).tolist())
            out, at = {}, 0
            for name, part in parts.items():
                out[name] = torch.tensor(flat[at : at + len(part)], dtype=torch.float64)
                at += len(part)
            parts = out
        return parts

    @classmethod
    @torch.no_grad()
    def from_model(
        cls, model: nn.Module, selection: ParameterSelection | None = None
    ) -> FullFinetuneTracker:
        """Snapshot the model's current weights as θ₀ (this rank's shards under FSDP2)."""
        params = perturbable_parameters(model, selection, allow_sharded=True)
        shards = {name: local_shard(p) for name, p in params}
        origin = {name: sh.tensor.to("cpu", copy=True) for name, sh in shards.items()}
        sharded = any(sh.sharded for sh in shards.values())
        layout = {name: (sh.offset, sh.numel) for name, sh in shards.items()} if sharded else None
        return cls(origin, selection, layout)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, model: nn.Module, selection: ParameterSelection | None = None
    ) -> FullFinetuneTracker:
        """Read θ₀ from the pre-finetune checkpoint folder (safetensors, sharded or not), tensor
        by tensor; under FSDP2 each rank keeps the slice of its own shard."""
        from safetensors import safe_open

        folder = Path(path)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").exists():
            weight_map = None
        else:
            raise FileNotFoundError(
                f"Cannot read the pre-finetune weights from {folder}: no model.safetensors(.index.json). "
                "Pass GuardConfig(origin=FOLDER) pointing at the model the finetune started from."
            )
        origin: dict[str, torch.Tensor] = {}
        layout: dict[str, tuple[int, int]] = {}
        handles: dict[str, Any] = {}
        sharded = False
        for name, param in perturbable_parameters(model, selection, allow_sharded=True):
            file = weight_map.get(name) if weight_map is not None else "model.safetensors"
            if file is None:
                continue
            if file not in handles:
                handles[file] = safe_open(str(folder / file), framework="pt", device="cpu")
            if name in handles[file].keys():  # noqa: SIM118 (safe_open has no __contains__)
                shard = local_shard(param)
                sharded = sharded or shard.sharded
                full = handles[file].get_tensor(name).to(shard.tensor.dtype).reshape(-1)
                origin[name] = full[shard.offset : shard.stop].clone().view(shard.tensor.shape)
                layout[name] = (shard.offset, shard.numel)
        if not origin:
            raise ValueError(f"{folder} holds none of the model's weights; is it the right model?")
        return cls(origin, selection, layout if sharded else None)

    @torch.no_grad()
    def displacement(self, model: nn.Module) -> float:
        names, squares = [], []
        count = 0
        for name, param in perturbable_parameters(model, self.selection, allow_sharded=True):
            ref = self.origin.get(name)
            count += 1
            if ref is None or self.norms.get(name, 0.0) == 0:
                continue
            names.append(name)
            squares.append(squared_distance(local_shard(param).tensor, ref))
        if self.sharded:
            squares = all_reduce_sum(squares)
        total = sum(sq / self.norms[n] ** 2 for n, sq in zip(names, squares, strict=True))
        return math.sqrt(total / max(count, 1))

    @contextlib.contextmanager
    def along(self, model: nn.Module, multiple: float) -> Iterator[None]:
        """Model at θ₀ + s·δ = θₜ + (s − 1)·δ inside the block; θₜ restored bit-exactly after.

        Under FSDP2 every rank moves its own shards (keeping a copy of them to restore from).
        """
        with WeightPerturbation(
            model,
            [_OriginDirection(self.origin)],
            selection=self.selection,
            orthogonalize=False,
            allow_sharded=self.sharded,
        ) as move:
            move.apply(multiple - 1.0)
            yield


class LoraTracker:
    """A LoRA finetune: δ is the adapters' update, θ₀ the frozen base weights."""

    kind = "lora"

    def __init__(self, model: nn.Module, selection: ParameterSelection | None = None) -> None:
        self.selection = selection or ParameterSelection()
        # a QLoRA base is read one dequantized tensor at a time (its norms only); an FSDP2 base
        # shard by shard (partial sums of squares, summed over ranks)
        params = perturbable_parameters(
            model, self.selection, allow_quantized=True, allow_sharded=True
        )
        self.sharded = is_sharded(p for _, p in params)
        if self.sharded:
            norms = sharded_norms([local_shard(p) for _, p in params], True)
        else:
            norms = [math.sqrt(squared_distance(dense_weight(p), None)) for _, p in params]
        self.norms = dict(zip((name for name, _ in params), norms, strict=True))
        self._sketch_index: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layer_cache: tuple[nn.Module, list[tuple[str, Any]]] | None = None

    @property
    def num_tensors(self) -> int:
        """Tensors the displacement averages over."""
        return len(self.norms)

    def sketch(self, model: nn.Module) -> torch.Tensor:
        """δ = scale·B A at the sketch coordinates of every adapted weight, layer-normalized."""
        return _concat(self.sketch_parts(model))

    @torch.no_grad()
    def sketch_parts(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The sketch, weight by weight (canonical name → its sampled, scaled δ values).

        Under FSDP2 the factors are gathered whole (:func:`~safety_guard.engines.shards.full_tensor`;
        small: r rows or columns), so every rank computes the same sketch."""
        if self.sharded:
            reshard(model)
        parts = {}
        for name, layer in self._layers(model):
            key = f"{name}.weight"
            norm0 = self.norms.get(key)
            base = getattr(layer, "base_layer", layer)
            weight = getattr(base, "weight", None)
            if not norm0 or weight is None:
                continue
            shape = dense_shape(weight)  # a 4-bit weight is stored packed
            rows, cols = shape[0], shape.numel() // shape[0]
            if key not in self._sketch_index:
                flat = _sketch_index(key, rows * cols)
                self._sketch_index[key] = (flat // cols, flat % cols)
            r, c = self._sketch_index[key]
            delta = torch.zeros(len(r), dtype=torch.float64)
            for adapter in layer.active_adapters:
                if adapter not in layer.lora_A:
                    continue
                a = full_tensor(layer.lora_A[adapter].weight)
                b = full_tensor(layer.lora_B[adapter].weight)
                a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
                if a.shape[1] != cols or b.shape[0] != rows:
                    continue  # a layer kind whose update is not B·A on the weight's layout
                picked = (b[r.to(b.device)].double() * a[:, c.to(a.device)].T.double()).sum(-1)
                delta += float(layer.scaling[adapter]) * picked.cpu()
            parts[key] = delta * math.sqrt(rows * cols / len(r)) / norm0
        return parts

    def _layers(self, model: nn.Module) -> list[tuple[str, Any]]:
        """The model's LoRA layers (looked up once per model: a walk of every module is slow)."""
        from peft.tuners.lora import LoraLayer

        root = unwrap_model(model)
        if self._layer_cache is None or self._layer_cache[0] is not root:
            layers = [
                (canonical_name(n), m) for n, m in root.named_modules() if isinstance(m, LoraLayer)
            ]
            self._layer_cache = (root, layers)
        return self._layer_cache[1]

    @torch.no_grad()
    def displacement(self, model: nn.Module) -> float:
        """‖scale·B A‖ / ‖W₀‖ per adapted weight, root mean square (the factors gathered whole
        under FSDP2, as in :meth:`sketch_parts`)."""
        if self.sharded:
            reshard(model)
        total = 0.0
        for name, layer in self._layers(model):
            norm0 = self.norms.get(f"{name}.weight")
            if not norm0:
                continue
            sq = 0.0
            for adapter in layer.active_adapters:
                if adapter not in layer.lora_A:
                    continue
                a = full_tensor(layer.lora_A[adapter].weight).float()
                b = full_tensor(layer.lora_B[adapter].weight).float()
                scale = float(layer.scaling[adapter])
                sq += scale**2 * float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0))
            total += sq / norm0**2
        return math.sqrt(total / max(len(self.norms), 1))

    @contextlib.contextmanager
    def along(self, model: nn.Module, multiple: float) -> Iterator[None]:
        """The adapters' scaling multiplied by ``multiple`` inside the block (θ₀ + s·δ)."""
        saved: list[tuple[Any, str, float]] = []
        try:
            for _, layer in self._layers(model):
                for adapter in layer.active_adapters:
                    if adapter in layer.scaling:
                        saved.append((layer, adapter, layer.scaling[adapter]))
                        layer.scaling[adapter] = layer.scaling[adapter] * multiple
            yield
        finally:
            for layer, adapter, value in saved:
                layer.scaling[adapter] = value


def make_tracker(
    model: nn.Module, selection: ParameterSelection | None = None
) -> FullFinetuneTracker | LoraTracker:
    """A LoRA tracker for a model with LoRA layers, a full-finetune tracker otherwise."""
    if is_lora(model):
        return LoraTracker(model, selection)
    return FullFinetuneTracker.from_model(model, selection)
