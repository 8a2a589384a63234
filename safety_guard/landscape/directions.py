"""Directions in weight space, generated tensor by tensor and never materialized whole: each
maps a canonical parameter name and θ₀'s tensor to its slice (float32, on θ₀'s device) or None.

* :class:`RandomDirection`: N(0, I) from a ``torch.Generator`` seeded by (seed, name) on the CPU
  in float32 (the same on CPU and GPU, for any weight dtype), rescaled to the norm of θ₀'s tensor
  ("layer", paper default) or of each row ("filter", Li et al. 2018).
* :class:`InterpolationDirection`: ``θ_target − θ_source`` (source defaults to θ₀), read tensor
  by tensor from a model, a state dict or a safetensors file.
* :class:`LoraDirection`: the update ``scale · B A`` of a LoRA adapter, one layer at a time.

Example:
    >>> import torch
    >>> d = RandomDirection(seed=0)
    >>> w = torch.ones(4, 3)
    >>> s = d.tensor("layer.weight", w)
    >>> torch.allclose(s.norm(), w.norm()), torch.equal(s, d.tensor("layer.weight", w.double()))
    (True, True)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from safety_guard.models.parameters import named_canonical_parameters
from safety_guard.models.wrappers import unwrap_model

__all__ = [
    "Direction",
    "InterpolationDirection",
    "LoraDirection",
    "RandomDirection",
    "direction_from_dict",
    "name_seed",
]

Normalization = Literal["layer", "filter", "none"]


@runtime_checkable
class Direction(Protocol):
    """A direction in weight space, one tensor at a time."""

    def tensor(self, name: str, origin: torch.Tensor) -> torch.Tensor | None:
        """The float32 slice of the direction for parameter ``name`` (``None``: zero)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, enough to rebuild the direction (see ``direction_from_dict``)."""
        ...


def name_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor: a stable 63-bit hash of (seed, canonical name).

    Example:
        >>> name_seed(0, "a") == name_seed(0, "a") != name_seed(1, "a")
        True
    """
    digest = hashlib.sha256(f"safety-guard:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


#: Elements per chunk when a random slice is streamed into a parameter (a multiple of 16, see
#: :func:`chunk_bounds`): 4 MiB of float32 at a time instead of a whole tensor.
CHUNK_ELEMENTS = 1 << 20


def chunk_bounds(numel: int, chunk: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` bounds that cut ``numel`` elements into chunks of ``chunk`` elements.

    ``torch.randn`` on a CPU generator draws the same stream in chunks as in one call when every
    chunk but the last holds a multiple of 16 elements and the last holds at least 16 (or is the
    whole tensor): a tail shorter than 16 is merged into the chunk before it.

    Example:
        >>> chunk_bounds(40, 16)
        [(0, 16), (16, 40)]
    """
    chunk = chunk or CHUNK_ELEMENTS
    if chunk % 16:
        raise ValueError(f"chunk must be a multiple of 16, got {chunk}.")
    bounds = []
    start = 0
    while start < numel:
        stop = min(start + chunk, numel)
        if numel - stop < 16:
            stop = numel
        bounds.append((start, stop))
        start = stop
    return bounds


def _squared_norm(flat: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> float:
    """Σ x² of a flat tensor, accumulated in float64 chunk by chunk (no full-size temporary)."""
    return sum(float(flat[a:b].double().pow(2).sum()) for a, b in bounds)


def _rescale(direction: torch.Tensor, origin: torch.Tensor, normalization: Normalization) -> None:
    """Rescale ``direction`` in place so its norm matches ``origin`` per row (filter) or tensor."""
    if normalization == "none":
        return
    if normalization == "filter" and direction.dim() > 1:
        ref = origin.float()
        d_norm = direction.flatten(1).norm(dim=1).clamp_min(1e-12)
        o_norm = ref.flatten(1).norm(dim=1)
        direction.mul_((o_norm / d_norm).view(-1, *([1] * (direction.dim() - 1))))
    else:
        bounds = chunk_bounds(direction.numel())
        d_sq = _squared_norm(direction.reshape(-1), bounds)
        o_sq = _squared_norm(origin.reshape(-1), bounds)
        direction.mul_(math.sqrt(o_sq / d_sq) if d_sq > 0 else 0.0)


class RandomDirection:
    """A Gaussian direction keyed by ``(seed, parameter name)``, normalized to the weights.

    Args:
        seed: the direction's seed; the same seed gives the same direction everywhere.
        normalization: ``"layer"`` (each tensor's slice has θ₀'s tensor norm, as in the paper),
            ``"filter"`` (per output row) or ``"none"``.

    With ``"layer"`` or ``"none"`` a slice can be *streamed* (:meth:`add_to`): generated and
    added chunk by chunk, so that a move never holds more than a few MiB of direction; the
    Gaussian norm of each tensor is cached (one float per tensor) after the first pass.
    """

    def __init__(self, seed: int, normalization: Normalization = "layer") -> None:
        if normalization not in ("layer", "filter", "none"):
            raise ValueError(
                f"normalization must be 'layer', 'filter' or 'none', got {normalization!r}."
            )
        self.seed = int(seed)
        self.normalization: Normalization = normalization
        self._gaussian_sq: dict[tuple[str, int], float] = {}

    @property
    def streamable(self) -> bool:
        """Whether :meth:`add_to` can stream this direction (not with filter normalization)."""
        return self.normalization != "filter"

    def _generator(self, name: str) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(name_seed(self.seed, name))

    def _gaussian_chunks(self, name: str, numel: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, chunk)`` of the raw float32 Gaussian slice of ``name``, in order."""
        generator = self._generator(name)
        for a, b in chunk_bounds(numel):
            yield a, b, torch.randn(b - a, generator=generator, dtype=torch.float32)

    def tensor(self, name: str, origin: torch.Tensor) -> torch.Tensor:
        out = torch.randn(origin.shape, generator=self._generator(name), dtype=torch.float32)
        _rescale(out, origin, self.normalization)
        return out.to(origin.device, non_blocking=True)

    def scale(self, name: str, origin: torch.Tensor) -> float:
        """The factor that turns the raw Gaussian slice of ``name`` into the direction's slice."""
        if not self.streamable:
            raise ValueError("Filter-normalized directions are not streamed; use tensor().")
        if self.normalization == "none":
            return 1.0
        o_sq = _squared_norm(origin.reshape(-1), chunk_bounds(origin.numel()))
        return self.scale_for(name, origin.numel(), o_sq)

    def scale_for(self, name: str, numel: int, origin_squared_norm: float) -> float:
        """:meth:`scale` from the squared norm of θ₀'s tensor (of ``numel`` elements), for a
        caller that sums it over shards.

        Example:
            >>> d = RandomDirection(seed=0)
            >>> w = torch.ones(4, 3)
            >>> d.scale_for("w", 12, 12.0) == d.scale("w", w)
            True
        """
        if not self.streamable:
            raise ValueError("Filter-normalized directions are not streamed; use tensor().")
        if self.normalization == "none":
            return 1.0
        d_sq = self.gaussian_squared_norm(name, numel)
        return math.sqrt(origin_squared_norm / d_sq) if d_sq > 0 else 0.0

    def gaussian_squared_norm(self, name: str, numel: int) -> float:
        """Σ g² of the raw Gaussian slice of ``name`` (``numel`` elements), in float64; cached
        (one float per tensor)."""
        key = (name, numel)
        if key not in self._gaussian_sq:
            self._gaussian_sq[key] = sum(
                float(chunk.double().pow(2).sum())
                for _, _, chunk in self._gaussian_chunks(name, numel)
            )
        return self._gaussian_sq[key]

    def gaussian_dot(self, other: RandomDirection, name: str, numel: int) -> float:
        """Σ g·g' of this direction's and ``other``'s raw Gaussian slices of ``name``, in float64,
        streamed chunk by chunk (both generated whole on every rank: it does not depend on how
        the tensor is sharded).

        Example:
            >>> a, b = RandomDirection(seed=0), RandomDirection(seed=1)
            >>> a.gaussian_dot(a, "w", 1000) == a.gaussian_squared_norm("w", 1000)
            True
        """
        if other is self or other.seed == self.seed:
            return self.gaussian_squared_norm(name, numel)
        return sum(
            float(x.double().mul(y.double()).sum())
            for (_, _, x), (_, _, y) in zip(
                self._gaussian_chunks(name, numel), other._gaussian_chunks(name, numel), strict=True
            )
        )

    @torch.no_grad()
    def gaussian_dot_range(self, name: str, numel: int, offset: int, values: torch.Tensor) -> float:
        """Σ g[offset + i]·values[i] of the raw Gaussian slice of ``name`` (``numel`` elements)
        over the range ``values`` covers, in float64: a shard's part of the dot product with a
        direction it holds the same range of (the stream before the range is drawn and dropped).

        Example:
            >>> d = RandomDirection(seed=0)
            >>> g = torch.cat([c for _, _, c in d._gaussian_chunks("w", 64)])
            >>> round(d.gaussian_dot_range("w", 64, 16, torch.ones(8)), 4) == round(float(g[16:24].double().sum()), 4)
            True
        """
        flat = values.reshape(-1)
        total = 0.0
        for lo, hi, gaussian in self._range_chunks(name, numel, offset, flat.numel()):
            part = flat[lo - offset : hi - offset].detach().to("cpu", torch.float64)
            total += float(gaussian.double().mul_(part).sum())
        return total

    def _range_chunks(
        self, name: str, numel: int, offset: int, length: int
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(lo, hi, chunk)``: the raw Gaussian slice of ``name`` at flat indices ``[lo, hi)``,
        chunk by chunk, over ``[offset, offset + length)`` (the stream before it drawn and
        dropped)."""
        stop = offset + length
        for a, b, chunk in self._gaussian_chunks(name, numel):
            if b <= offset:
                continue
            if a >= stop:
                break
            lo, hi = max(a, offset), min(b, stop)
            yield lo, hi, chunk[lo - a : hi - a]

    @torch.no_grad()
    def add_to(
        self,
        name: str,
        target: torch.Tensor,
        coefficient: float,
        scale: float,
        offset: int = 0,
        numel: int | None = None,
    ) -> None:
        """``target += coefficient · slice`` chunk by chunk (``scale`` from :meth:`scale`).

        ``target`` is the flat (1-D, contiguous) view of a parameter of any dtype and device;
        each chunk is added in float32 and rounded once to the parameter's dtype. A *shard*
        (FSDP2) passes the flat index of its first element in the full tensor (``offset``)
        and the full tensor's ``numel``: it receives that range of the same slice, so a
        direction does not depend on how the model is sharded (the Gaussian stream before the
        range is drawn and dropped).
        """
        numel = target.numel() if numel is None else numel
        for lo, hi, gaussian in self._range_chunks(name, numel, offset, target.numel()):
            part = gaussian.to(target.device, non_blocking=True).mul_(scale)
            view = target[lo - offset : hi - offset]
            if target.dtype == torch.float32:
                view.add_(part, alpha=float(coefficient))
            else:
                view.copy_(view.float().add_(part, alpha=float(coefficient)))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "random", "seed": self.seed, "normalization": self.normalization}

    def __repr__(self) -> str:
        return f"RandomDirection(seed={self.seed}, normalization={self.normalization!r})"


class _TensorSource:
    """Read tensors by canonical name from a module, a mapping or safetensors weights, lazily.

    A path may be one ``.safetensors`` file or a folder: one file, or a sharded checkpoint (the
    ``*.safetensors.index.json`` that ``save_pretrained`` writes maps each tensor to its shard;
    without one, the shards' own key lists are read). Shards are opened when first read from and
    each tensor is read alone, so a 70B target never sits in memory whole.
    """

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | str | Path) -> None:
        self._files: dict[Path, Any] = {}
        self._where: dict[str, Path] | None = None
        if isinstance(source, nn.Module):
            self._tensors: Mapping[str, torch.Tensor] = dict(named_canonical_parameters(source))
        elif isinstance(source, Mapping):
            self._tensors = source
        else:
            self._tensors = {}
            self._where = _safetensors_map(Path(source))
        self.description = str(source) if isinstance(source, str | Path) else type(source).__name__

    def get(self, name: str) -> torch.Tensor | None:
        if self._where is None:
            return self._tensors.get(name)
        path = self._where.get(name)
        if path is None:
            return None
        if path not in self._files:
            from safetensors import safe_open

            self._files[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._files[path].get_tensor(name)


def _safetensors_map(path: Path) -> dict[str, Path]:
    """Tensor name → the ``.safetensors`` file holding it, for a file or a (sharded) folder."""
    from safetensors import safe_open

    if not path.exists():
        raise FileNotFoundError(f"No such weights file or folder: {path}")
    if path.is_file():
        files = [path]
    else:
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise ValueError(
                f"{path} holds {len(indexes)} safetensors index files "
                f"({', '.join(p.name for p in indexes)}); pass the folder of one checkpoint."
            )
        if indexes:
            weight_map = json.loads(indexes[0].read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{indexes[0]} has no weight_map; is it a safetensors index?")
            missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
            if missing:
                raise FileNotFoundError(
                    f"{indexes[0].name} names shards missing from {path}: {missing[:3]}; copy "
                    "the whole checkpoint folder."
                )
            return {name: path / file for name, file in weight_map.items()}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .safetensors weights.")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                if name in where:
                    raise ValueError(
                        f"{name} is in both {where[name].name} and {file.name} under {path}; "
                        "pass the folder of one checkpoint."
                    )
                where[name] = file
    return where


class InterpolationDirection:
    """``θ_target − θ_source``: α = 0 is the source (by default θ₀), α = 1 the target.

    Args:
        target: the finetuned weights: a model, a state dict (canonical names) or a safetensors
            file.
        source: the aligned weights, same forms; ``None`` uses the origin θ₀ of the perturbed
            model itself (the usual case: perturb the aligned model towards the finetuned one).

    Tensors missing from the target get a zero slice.
    """

    def __init__(
        self,
        target: nn.Module | Mapping[str, torch.Tensor] | str | Path,
        source: nn.Module | Mapping[str, torch.Tensor] | str | Path | None = None,
    ) -> None:
        self._target = _TensorSource(target)
        self._source = _TensorSource(source) if source is not None else None

    def tensor(self, name: str, origin: torch.Tensor) -> torch.Tensor | None:
        target = self._target.get(name)
        if target is None:
            return None
        if target.shape != origin.shape:
            raise ValueError(
                f"Interpolation target tensor {name!r} has shape {tuple(target.shape)}, but the "
                f"model's has {tuple(origin.shape)}: the two checkpoints are different architectures."
            )
        out = target.to(origin.device, torch.float32, copy=True)
        if self._source is None:
            out.sub_(origin.float())
        else:
            source = self._source.get(name)
            if source is None:
                return None
            out.sub_(source.to(origin.device, torch.float32))
        return out

    def shard_tensor(
        self, name: str, origin: torch.Tensor, offset: int, shape: Sequence[int]
    ) -> torch.Tensor | None:
        """The flat float32 part of :meth:`tensor` for one FSDP2 shard: elements ``offset`` to
        ``offset + origin.numel()`` of the full tensor (of ``shape``), ``origin`` being that
        shard of θ₀. The target (and source) tensor is read whole, one at a time.

        Example:
            >>> d = InterpolationDirection({"w": torch.arange(6.0).reshape(2, 3)})
            >>> d.shard_tensor("w", torch.zeros(2), offset=3, shape=(2, 3)).tolist()
            [3.0, 4.0]
        """
        target = self._target.get(name)
        if target is None:
            return None
        _check_shape("Interpolation target", name, target.shape, shape)
        stop = offset + origin.numel()
        out = target.reshape(-1)[offset:stop].to(origin.device, torch.float32, copy=True)
        if self._source is None:
            return out.sub_(origin.reshape(-1).float())
        source = self._source.get(name)
        if source is None:
            return None
        _check_shape("Interpolation source", name, source.shape, shape)
        return out.sub_(source.reshape(-1)[offset:stop].to(origin.device, torch.float32))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "interpolation",
            "target": self._target.description,
            "source": self._source.description if self._source is not None else "origin",
        }


class LoraDirection:
    """The weight update of a LoRA adapter, ``scale · B @ A`` per adapted weight.

    Args:
        adapter: a live ``peft.PeftModel`` (its active adapter is used) or a folder written by
            ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``).
        adapter_name: which adapter of a live model (default: the active one).

    Only LoRA adapters without DoRA are supported.
    """

    def __init__(self, adapter: nn.Module | str | Path, adapter_name: str | None = None) -> None:
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
        if isinstance(adapter, nn.Module):
            self._from_model(adapter, adapter_name)
            self.description = f"peft:{adapter_name or 'active'}"
        else:
            self._from_folder(Path(adapter))
            self.description = str(adapter)
        if not self._factors:
            raise ValueError("The adapter has no LoRA layers, so it defines no direction.")

    def _from_model(self, model: nn.Module, adapter_name: str | None) -> None:
        from peft.tuners.lora import LoraLayer

        root = unwrap_model(model)
        for name, module in root.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            active = adapter_name or (module.active_adapters[0] if module.active_adapters else None)
            if active is None or active not in module.lora_A:
                continue
            if module.use_dora.get(active, False):
                raise ValueError("DoRA adapters are not supported by LoraDirection.")
            a = module.lora_A[active].weight
            b = module.lora_B[active].weight
            fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
            self._factors[f"{name}.weight"] = (a, b, float(module.scaling[active]), fan_in_fan_out)

    def _from_folder(self, folder: Path) -> None:
        from safetensors.torch import load_file

        config_path = folder / "adapter_config.json"
        weights_path = folder / "adapter_model.safetensors"
        if not config_path.exists() or not weights_path.exists():
            raise FileNotFoundError(
                f"{folder} is not a PEFT adapter folder: expected adapter_config.json and "
                "adapter_model.safetensors (written by PeftModel.save_pretrained)."
            )
        config = json.loads(config_path.read_text())
        if config.get("peft_type") != "LORA":
            raise ValueError(f"Only LoRA adapters are supported, got {config.get('peft_type')!r}.")
        if config.get("use_dora"):
            raise ValueError("DoRA adapters are not supported by LoraDirection.")
        tensors = load_file(str(weights_path))
        r, alpha = config["r"], config.get("lora_alpha", config["r"])
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        use_rslora = bool(config.get("use_rslora"))
        prefix = "base_model.model."
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            module_name = key.split(".lora_A.")[0]
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                continue
            short = module_name[len(prefix) :] if module_name.startswith(prefix) else module_name
            rank = next((v for k, v in rank_pattern.items() if short.endswith(k)), r)
            lora_alpha = next((v for k, v in alpha_pattern.items() if short.endswith(k)), alpha)
            scale = lora_alpha / (rank**0.5 if use_rslora else rank)
            self._factors[f"{short}.weight"] = (
                a,
                b,
                float(scale),
                bool(config.get("fan_in_fan_out")),
            )

    def factors(self) -> Mapping[str, tuple[torch.Tensor, torch.Tensor, float, bool]]:
        """``{canonical weight name: (A, B, scale, fan_in_fan_out)}``."""
        return self._factors

    def _factors_on(
        self, name: str, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, float, bool] | None:
        """(A, B, scale, fan_in_fan_out) of ``name`` in float32 on ``device`` (None: no LoRA)."""
        entry = self._factors.get(name)
        if entry is None:
            return None
        a, b, scale, fan_in_fan_out = entry
        a = a.detach().to(device, torch.float32)
        b = b.detach().to(device, torch.float32)
        return a, b, scale, fan_in_fan_out

    def tensor(self, name: str, origin: torch.Tensor) -> torch.Tensor | None:
        entry = self._factors_on(name, origin.device)
        if entry is None:
            return None
        a, b, scale, fan_in_fan_out = entry
        delta = (b @ a).mul_(scale)
        if fan_in_fan_out:
            delta = delta.T.contiguous()
        if delta.shape != origin.shape:
            raise ValueError(
                f"LoRA update for {name!r} has shape {tuple(delta.shape)}, the weight has "
                f"{tuple(origin.shape)}: the adapter was trained on another model."
            )
        return delta

    def shard_tensor(
        self, name: str, origin: torch.Tensor, offset: int, shape: Sequence[int]
    ) -> torch.Tensor | None:
        """The flat float32 part of :meth:`tensor` for one FSDP2 shard (elements ``offset`` to
        ``offset + origin.numel()`` of the full update ``scale · B @ A``, made one weight at a
        time from the small factors)."""
        entry = self._factors_on(name, origin.device)
        if entry is None:
            return None
        a, b, scale, fan_in_fan_out = entry
        full = (a.shape[1], b.shape[0]) if fan_in_fan_out else (b.shape[0], a.shape[1])
        _check_shape("LoRA update", name, full, shape)
        cols = full[1]
        stop = offset + origin.numel()
        first, last = offset // cols, -(-stop // cols)  # the rows the shard's range covers
        rows = (b @ a[:, first:last]).T if fan_in_fan_out else b[first:last] @ a
        flat = rows.reshape(-1)[offset - first * cols : stop - first * cols]
        return flat.mul_(scale)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "lora", "adapter": self.description}


def direction_from_dict(spec: Mapping[str, Any]) -> Direction:
    """Rebuild a random direction from its ``to_dict()`` description.

    Example:
        >>> direction_from_dict({"kind": "random", "seed": 3}).seed
        3
    """
    kind = spec.get("kind")
    if kind == "random":
        return RandomDirection(seed=spec["seed"], normalization=spec.get("normalization", "layer"))
    if kind == "interpolation":
        target = spec.get("target")
        if not target or not Path(target).exists():
            raise ValueError(
                "This interpolation direction was built from an in-memory model; pass the "
                "target model again to rebuild it."
            )
        source = spec.get("source")
        return InterpolationDirection(target, None if source in (None, "origin") else source)
    if kind == "lora":
        return LoraDirection(spec["adapter"])
    raise ValueError(
        f"Unknown direction kind {kind!r}; expected 'random', 'interpolation' or 'lora'."
    )


def _check_shape(what: str, name: str, got: Sequence[int], want: Sequence[int]) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(
            f"{what} tensor {name!r} has shape {tuple(got)}, but the model's has {tuple(want)}: "
            "the two checkpoints are different architectures."
        )
