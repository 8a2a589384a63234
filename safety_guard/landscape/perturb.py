"""Move a model to θ₀ + α·d₁ (+ β·d₂) in place and put θ₀ back bit for bit.

Every move starts from the saved origin θ₀ (never from the previous point), so there is no
drift however many moves are made, and :meth:`WeightPerturbation.restore` copies the saved bytes
back. Extra memory: one copy of the moved weights in their own dtype (on the CPU by default, or in
a scratch file on disk with ``offload="disk"``) plus a few tensors' worth of direction slices.

Example:
    >>> import torch
    >>> from safety_guard.landscape.directions import RandomDirection
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> before = model[0].weight.clone()
    >>> with WeightPerturbation(model, [RandomDirection(seed=0)]) as move:
    ...     move.apply(0.5)
    ...     moved = not torch.equal(model[0].weight, before)
    >>> moved, torch.equal(model[0].weight, before)
    (True, True)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from safety_guard.engines.collectives import all_reduce_sum
from safety_guard.engines.shards import (
    LocalShard,
    is_sharded,
    local_shard,
    reshard,
    squared_distance,
)
from safety_guard.landscape.directions import Direction, RandomDirection
from safety_guard.landscape.orthogonal import (
    direction_slices,
    gram_schmidt_rows,
    orthogonal_coefficients,
)
from safety_guard.models.parameters import (
    ParameterSelection,
    UnsupportedEngineError,
    check_finite,
    perturbable_parameters,
)

__all__ = ["WeightPerturbation"]


def check_shard_directions(directions: Sequence[Direction], orthogonalize: bool) -> None:
    """Refuse, by name, directions that cannot be applied shard by shard (FSDP2, ZeRO-3):
    filter-normalized random directions and directions with neither an elementwise slice nor a
    shard's range of one (``shard_tensor``)."""
    for d in directions:
        if getattr(d, "elementwise", False) or hasattr(d, "shard_tensor"):
            continue
        if not isinstance(d, RandomDirection):
            raise UnsupportedEngineError(
                f"{type(d).__name__} is not applied per shard (FSDP2, ZeRO-3): random, "
                "interpolation and LoRA directions are, and elementwise ones; compute this "
                "landscape with the model replicated (one process, or DDP under torchrun without "
                "sharding)."
            )
        if not d.streamable:
            raise UnsupportedEngineError(
                "filter-normalized random directions are not applied per shard (FSDP2, ZeRO-3) "
                "yet: use normalization='layer' (the paper's), or a replicated model."
            )


def _shard_slice(direction: Direction, name: str, shard: LocalShard) -> torch.Tensor | None:
    """A direction's slice for one shard (its θ₀ in ``shard.tensor``), when it is made whole
    here: elementwise directions from the shard's values, interpolation and LoRA ones from the
    shard's index range (``shard_tensor``). ``None`` for random directions, streamed instead."""
    if getattr(direction, "elementwise", False):
        return direction.tensor(name, shard.tensor)
    if hasattr(direction, "shard_tensor"):
        return direction.shard_tensor(name, shard.tensor, shard.offset, shard.shape)
    return None


Offload = Literal["cpu", "disk"]


class _DiskSnapshot:
    """Raw bytes of each tensor in one scratch file; restore reads straight into the parameter."""

    def __init__(self, directory: str | None = None) -> None:
        fd, path = tempfile.mkstemp(prefix="safety-guard-origin-", suffix=".bin", dir=directory)
        self.path = Path(path)
        self._file = os.fdopen(fd, "w+b", buffering=0)
        self._offsets: dict[str, tuple[int, int]] = {}

    def save(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().cpu()
        raw = data.view(-1).view(torch.uint8).numpy()
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(memoryview(raw))
        self._offsets[name] = (offset, raw.nbytes)

    def load_into(self, name: str, param: torch.Tensor) -> None:
        offset, nbytes = self._offsets[name]
        self._file.seek(offset)
        if param.device.type == "cpu" and param.is_contiguous():
            target = param.data.view(-1).view(torch.uint8).numpy()
            self._file.readinto(memoryview(target))
        else:
            buffer = torch.empty(param.shape, dtype=param.dtype)
            self._file.readinto(memoryview(buffer.view(-1).view(torch.uint8).numpy()))
            param.data.copy_(buffer)
        del nbytes

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        out = torch.empty(like.shape, dtype=like.dtype)
        offset, _ = self._offsets[name]
        self._file.seek(offset)
        self._file.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class WeightPerturbation:
    """Context manager that perturbs a model along fixed directions and restores it exactly.

    Args:
        model: any ``nn.Module`` (transformers model, PEFT-wrapped model ...).
        directions: one or two directions (any number works; they are orthogonalized in order
            when ``orthogonalize`` is true).
        selection: which parameters random directions move (norm layers excluded by default).
            Interpolation and LoRA directions also move only these.
        orthogonalize: Gram–Schmidt the directions tensor by tensor.
        offload: where the copy of θ₀ lives: ``"cpu"`` (RAM, own dtype) or ``"disk"`` (a scratch
            file, so extra RAM is one tensor; restores are then bounded by disk speed).
        check_finite: refuse weights holding NaN/inf with a clear error.
        allow_sharded: FSDP2 ``DTensor`` parameters and ZeRO-3 partitions are moved shard by
            shard: each rank saves and moves its own shard in place. Elementwise directions
            (``elementwise = True``: a shard's slice depends on that shard's values only, like
            the guard's δ = θₜ − θ₀) and layer-normalized random directions (each shard gets
            its index range of the same slice, scaled by θ₀'s norms summed over ranks, so the
            move does not depend on the world size) work, several of them orthogonalized too (a 2D landscape: each
            shard adds its range of the same combination of their Gaussians), and
            interpolation and LoRA directions (the shard's range of the target's tensor), also
            in a surface with random ones (orthogonalized from dot products summed over the
            ranks); filter-normalized directions are refused (:func:`check_shard_directions`).

    Use :meth:`apply` to move to ``θ₀ + Σ cᵢ·dᵢ`` and :meth:`restore` (or leaving the ``with``
    block, also on an exception) to return to θ₀.
    """

    def __init__(
        self,
        model: nn.Module,
        directions: Sequence[Direction],
        *,
        selection: ParameterSelection | None = None,
        orthogonalize: bool = True,
        offload: Offload = "cpu",
        check_finite: bool = True,
        scratch_dir: str | None = None,
        allow_sharded: bool = False,
    ) -> None:
        if not directions:
            raise ValueError("WeightPerturbation needs at least one direction.")
        if offload not in ("cpu", "disk"):
            raise ValueError(f"offload must be 'cpu' or 'disk', got {offload!r}.")
        self.model = model
        self.directions = list(directions)
        self.orthogonalize = orthogonalize
        self.offload: Offload = offload
        self._params = perturbable_parameters(model, selection, allow_sharded=allow_sharded)
        self._sharded = allow_sharded and is_sharded(p for _, p in self._params)
        if self._sharded:
            check_shard_directions(self.directions, orthogonalize)
        self._origin_sq: dict[str, float] | None = None  # θ₀'s full-tensor Σx² (on shards)
        self._rows: dict[str, list[list[float]]] = {}  # orthogonalized combinations per tensor
        self._check_finite = check_finite
        self._scratch_dir = scratch_dir
        self._ram: dict[str, torch.Tensor] | None = None
        self._disk: _DiskSnapshot | None = None
        self._moved = False
        self.coefficients: tuple[float, ...] = tuple(0.0 for _ in self.directions)

    def _targets(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor moved in place): the parameters, or this rank's shards of them (the
        model resharded first, so that the next forward all-gathers what is written here)."""
        if self._sharded:
            reshard(self.model)
        return self._local()

    def _local(self) -> list[tuple[str, torch.Tensor]]:
        if not self._sharded:
            return self._params
        return [(name, local_shard(p).tensor) for name, p in self._params]

    def _shards(self) -> list[tuple[str, LocalShard]]:
        reshard(self.model)
        return [(name, local_shard(p)) for name, p in self._params]

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> WeightPerturbation:
        self.save()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.no_grad()
    def save(self) -> None:
        """Record θ₀ of every perturbable parameter (called by ``__enter__``)."""
        targets = self._targets()
        if self._check_finite:
            check_finite(targets)
        if self.offload == "disk":
            self._disk = _DiskSnapshot(self._scratch_dir)
            for name, param in targets:
                self._disk.save(name, param)
        else:
            pin = torch.cuda.is_available() and any(p.is_cuda for _, p in targets)
            self._ram = {}
            for name, param in targets:
                copy = torch.empty(param.shape, dtype=param.dtype, pin_memory=pin)
                copy.copy_(param.detach(), non_blocking=pin)
                self._ram[name] = copy
            if pin:
                torch.cuda.synchronize()
        if self._sharded and not all(getattr(d, "elementwise", False) for d in self.directions):
            # layer normalization needs θ₀'s full-tensor norms: partial sums, one all-reduce
            partial = [squared_distance(t, None) for _, t in targets]
            summed = all_reduce_sum(partial)
            self._origin_sq = {name: v for (name, _), v in zip(targets, summed, strict=True)}

    def close(self) -> None:
        """Restore θ₀ and free the saved copy."""
        try:
            if self._ram is not None or self._disk is not None:
                self.restore()
        finally:
            self._ram = None
            if self._disk is not None:
                self._disk.close()
                self._disk = None

    @property
    def num_parameters(self) -> int:
        """Number of weights the directions may move (on this rank, when sharded)."""
        return sum(p.numel() for _, p in self._local())

    @property
    def saved_bytes(self) -> int:
        """Bytes held by the copy of θ₀ (in RAM or on disk; this rank's shards when sharded)."""
        return sum(p.numel() * p.element_size() for _, p in self._local())

    # -- moves -------------------------------------------------------------------------------
    def _load_origin(self, name: str, param: torch.Tensor) -> None:
        """Copy θ₀ of one tensor back into the parameter."""
        if self._ram is not None:
            param.data.copy_(self._ram[name], non_blocking=True)
        elif self._disk is not None:
            self._disk.load_into(name, param)
        else:
            raise RuntimeError("WeightPerturbation is not active: use it as a context manager.")

    @torch.no_grad()
    def apply(self, *coefficients: float) -> None:
        """Set the weights to ``θ₀ + Σ coefficients[i] · directions[i]`` (computed in float32).

        Tensor by tensor: θ₀ is copied back into the parameter, the direction slices are
        generated against it, and added in place (float32 weights) or through one float32
        temporary (bf16/fp16 weights). Random directions with layer (or no) normalization are
        streamed in chunks of 4 MiB (1D, or several directions without orthogonalization), so
        a move holds no whole slice; other directions hold one slice per direction at a time.
        """
        if len(coefficients) != len(self.directions):
            raise ValueError(
                f"apply() takes one coefficient per direction ({len(self.directions)}), "
                f"got {len(coefficients)}."
            )
        if all(c == 0 for c in coefficients):
            self.restore()
            return
        self._moved = True  # set first: a failure half-way still restores on close()
        if self._sharded:
            self._apply_shards(coefficients)
            self.coefficients = tuple(float(c) for c in coefficients)
            return
        streamed = all(isinstance(d, RandomDirection) and d.streamable for d in self.directions)
        for name, param in self._targets():
            self._load_origin(name, param)
            if streamed and param.data.is_contiguous():
                flat = param.data.view(-1)
                if self._combined:
                    self._add_combined(name, flat, coefficients, 0, flat.numel())
                    continue
                for c, d in zip(coefficients, self.directions, strict=True):
                    if c != 0:
                        d.add_to(name, flat, c, d.scale(name, flat))  # type: ignore[attr-defined]
                continue
            slices = direction_slices(self.directions, name, param.data, self.orthogonalize)
            if all(s is None for s in slices):
                continue
            if param.dtype == torch.float32:
                for c, s in zip(coefficients, slices, strict=True):
                    if s is not None and c != 0:
                        param.data.add_(s, alpha=float(c))
            else:
                moved = param.data.float()
                for c, s in zip(coefficients, slices, strict=True):
                    if s is not None and c != 0:
                        moved.add_(s, alpha=float(c))
                param.data.copy_(moved)
                del moved
            del slices
        self.coefficients = tuple(float(c) for c in coefficients)

    @property
    def _combined(self) -> bool:
        """Several random directions Gram–Schmidt orthogonalized: moved as one combination of
        their raw Gaussians (:func:`~safety_guard.landscape.directions.orthogonal_coefficients`)."""
        return (
            self.orthogonalize
            and len(self.directions) > 1
            and all(isinstance(d, RandomDirection) and d.streamable for d in self.directions)
        )

    def _add_combined(
        self,
        name: str,
        flat: torch.Tensor,
        coefficients: Sequence[float],
        offset: int,
        numel: int,
    ) -> None:
        """``flat += Σ_j c_j · orthogonalized slice j``, one streamed Gaussian per direction
        (``flat`` holds θ₀: the whole tensor, or the shard at ``offset`` of ``numel``)."""
        rows = self._rows.get(name)
        if rows is None:  # θ₀'s norm and the Gaussians are fixed: once per tensor
            origin_sq = self._origin_sq[name] if self._sharded else squared_distance(flat, None)
            rows = orthogonal_coefficients(self.directions, name, numel, origin_sq)  # type: ignore[arg-type]
            self._rows[name] = rows
        for i, d in enumerate(self.directions):
            total = sum(c * row[i] for c, row in zip(coefficients, rows, strict=True))
            if total != 0:
                d.add_to(name, flat, total, 1.0, offset=offset, numel=numel)  # type: ignore[attr-defined]

    def _add_mixed(
        self, name: str, shard: LocalShard, flat: torch.Tensor, coefficients: Sequence[float]
    ) -> None:
        """``flat += Σ_j c_j · orthogonalized slice j`` on a shard, for a surface that mixes
        random directions with interpolation, LoRA or elementwise ones (what
        :func:`~safety_guard.landscape.directions.direction_slices` does to whole slices).

        The orthogonalized slices are combinations of the *base* slices — each random
        direction's raw Gaussian, each other direction's own slice — found from their Gram
        matrix over the whole tensor: Gaussian·Gaussian products every rank computes itself,
        products with another direction's slice as per-shard partial sums, all-reduced (a
        collective, once per tensor: every rank calls it for the same tensors in order).
        """
        gaussian = [isinstance(d, RandomDirection) for d in self.directions]
        # the shard's range of each other direction's slice (None: none for this tensor)
        base = [
            None if g else _shard_slice(d, name, shard)
            for d, g in zip(self.directions, gaussian, strict=True)
        ]
        rows = self._rows.get(name)
        if rows is None:
            rows = self._mixed_rows(name, shard, gaussian, base)
            self._rows[name] = rows
        for i, d in enumerate(self.directions):
            total = sum(c * row[i] for c, row in zip(coefficients, rows, strict=True))
            if total == 0:
                continue
            part = base[i]
            if gaussian[i]:
                d.add_to(name, flat, total, 1.0, offset=shard.offset, numel=shard.numel)  # type: ignore[attr-defined]
            elif part is None:
                continue
            elif flat.dtype == torch.float32:
                flat.add_(part.reshape(-1), alpha=float(total))
            else:
                flat.copy_(flat.float().add_(part.reshape(-1), alpha=float(total)))

    def _mixed_rows(
        self,
        name: str,
        shard: LocalShard,
        gaussian: list[bool],
        base: list[torch.Tensor | None],
    ) -> list[list[float]]:
        """The orthogonalized combinations of one tensor's base slices (:meth:`_add_mixed`)."""
        n = len(self.directions)
        pairs = [(i, k) for i in range(n) for k in range(i, n)]
        partial = []
        for i, k in pairs:
            if gaussian[i] and gaussian[k]:
                partial.append(0.0)  # whole-tensor, every rank computes it below
            elif gaussian[i] or gaussian[k]:
                rand, other = (i, k) if gaussian[i] else (k, i)
                values = base[other]
                partial.append(
                    self.directions[rand].gaussian_dot_range(  # type: ignore[attr-defined]
                        name, shard.numel, shard.offset, values
                    )
                    if values is not None and values.numel()
                    else 0.0
                )
            else:
                a, b = base[i], base[k]
                partial.append(
                    0.0 if a is None or b is None else float((a.double() * b.double()).sum())
                )
        summed = all_reduce_sum(partial)
        gram = [[0.0] * n for _ in range(n)]
        for (i, k), v in zip(pairs, summed, strict=True):
            if gaussian[i] and gaussian[k]:
                v = self.directions[i].gaussian_dot(self.directions[k], name, shard.numel)  # type: ignore[attr-defined]
            gram[i][k] = gram[k][i] = v
        scales = [
            d.scale_for(name, shard.numel, self._origin_sq[name]) if g else 1.0  # type: ignore[attr-defined,index]
            for d, g in zip(self.directions, gaussian, strict=True)
        ]
        return gram_schmidt_rows(gram, scales, gaussian)

    def _apply_shards(self, coefficients: Sequence[float]) -> None:
        """:meth:`apply` on this rank's shards (FSDP2, ZeRO-3): elementwise directions from the
        shard's own values, random, interpolation and LoRA ones as the shard's index range of
        the same slice (several orthogonalized random ones as that range of their combination,
        a mix of random and other ones from dot products summed over the ranks)."""
        for name, shard in self._shards():
            local = shard.tensor
            self._load_origin(name, local)
            if self._combined:
                flat = local.view(-1) if local.is_contiguous() else local.reshape(-1).clone()
                self._add_combined(name, flat, coefficients, shard.offset, shard.numel)
                if flat.data_ptr() != local.data_ptr():
                    local.copy_(flat.view(local.shape))
                continue
            flat = local.view(-1) if local.is_contiguous() else local.reshape(-1).clone()
            if self.orthogonalize and len(self.directions) > 1:
                self._add_mixed(name, shard, flat, coefficients)
                if flat.data_ptr() != local.data_ptr():
                    local.copy_(flat.view(local.shape))
                continue
            slices = [
                _shard_slice(d, name, shard) if c != 0 else None
                for c, d in zip(coefficients, self.directions, strict=True)
            ]
            for c, d, s in zip(coefficients, self.directions, slices, strict=True):
                if c == 0:
                    continue
                if s is not None:
                    if flat.dtype == torch.float32:
                        flat.add_(s.reshape(-1), alpha=float(c))
                    else:
                        flat.copy_(flat.float().add_(s.reshape(-1), alpha=float(c)))
                elif isinstance(d, RandomDirection):
                    scale = d.scale_for(name, shard.numel, self._origin_sq[name])
                    d.add_to(name, flat, c, scale, offset=shard.offset, numel=shard.numel)
            if flat.data_ptr() != local.data_ptr():
                local.copy_(flat.view(local.shape))

    @torch.no_grad()
    def restore(self, force: bool = False) -> None:
        """Copy θ₀ back into the model, bit for bit (a no-op when it was not moved)."""
        if not (self._moved or force) and (self._ram is not None or self._disk is not None):
            return
        targets = self._targets()
        if self._ram is not None:
            for name, param in targets:
                param.data.copy_(self._ram[name], non_blocking=True)
            if any(p.is_cuda for _, p in targets):
                torch.cuda.synchronize()
        elif self._disk is not None:
            for name, param in targets:
                self._disk.load_into(name, param)
        else:
            raise RuntimeError("WeightPerturbation is not active: use it as a context manager.")
        self._moved = False
        self.coefficients = tuple(0.0 for _ in self.directions)
