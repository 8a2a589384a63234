"""Shard-local views of parameters sharded by FSDP2 (``fully_shard``: ``DTensor`` on dim 0) or
partitioned by DeepSpeed ZeRO-3.

The guard's moves are elementwise in parameter space (θ₀ + s·δ), so a rank can keep θ₀ for its
own shard only and move its shard in place; norms and sampled values are per-shard partial
results summed over ranks. :func:`local_shard` says which slice of the full (flattened) tensor a
rank holds: FSDP2 splits dim 0 in ``ceil(rows / world)``-row chunks, ZeRO-3 the flattened tensor
(padded to a multiple of the world size) in equal partitions, so either shard is one contiguous
range of the row-major flattening. A ZeRO-3 parameter is empty outside its module's forward, so
it always reads as sharded (also on one rank); :func:`reshard` releases the gathered copies
ZeRO-3 keeps (its *persistent* small parameters), so that the next forward gathers what was
written to the partitions.

Example:
    >>> import torch
    >>> shard = local_shard(torch.nn.Parameter(torch.ones(4, 2)))  # not sharded: all of it
    >>> shard.offset, shard.numel, shard.sharded
    (0, 8, False)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .distributed import all_reduce_sum

__all__ = [
    "LocalShard",
    "full_tensor",
    "is_sharded",
    "is_sharded_model",
    "is_zero3",
    "local_shard",
    "reshard",
    "shard_model",
    "sharded_norms",
    "squared_distance",
    "values_at",
]

#: Elements per chunk of the float64 sums (a few MiB of temporaries, not a tensor's worth).
_CHUNK = 1 << 20


def _dtensor_type() -> type | tuple[()]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return ()
    return DTensor


@dataclass
class LocalShard:
    """The part of one parameter this rank holds.

    Attributes:
        tensor: the local data (a view: in-place changes change the parameter).
        offset: flat index of its first element in the full tensor.
        numel: elements of the full tensor.
        shape: shape of the full tensor.
        sharded: whether other ranks hold the rest (False: this is the whole tensor).
    """

    tensor: torch.Tensor
    offset: int
    numel: int
    shape: torch.Size
    sharded: bool

    @property
    def stop(self) -> int:
        return self.offset + self.tensor.numel()


def is_zero3(param: torch.Tensor) -> bool:
    """Whether ``param`` is partitioned by DeepSpeed ZeRO-3 (it carries its partition)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


def _value(location: object) -> object:
    """An enum's value (DeepSpeed's offload locations are string enums), else as it is."""
    return getattr(location, "value", location)


def _zero3_shard(param: torch.Tensor) -> LocalShard:
    """The ZeRO-3 partition of ``param`` this rank holds, without its padding."""
    import torch.distributed as dist

    part = param.ds_tensor  # type: ignore[attr-defined]
    unsupported = None
    if getattr(param, "ds_zero_param_process_group", None) is not None:
        unsupported = "ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1)"
    elif hasattr(part, "ds_quant_scale"):
        unsupported = "quantized ZeRO-3 weights (zero_quantized_weights)"
    elif part is None or _value(getattr(part, "final_location", None)) == "nvme":
        unsupported = "partitions offloaded to NVMe (offload_param.device: nvme)"
    if unsupported is not None:
        raise ValueError(
            f"safety-guard moves ZeRO-3 partitions held in memory; this model uses {unsupported}."
        )
    group = getattr(param, "ds_process_group", None)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world != dist.get_world_size():
        raise ValueError(
            f"this model's ZeRO-3 partitions span {world} of the {dist.get_world_size()} ranks "
            "(MiCS or another partition group smaller than the world): safety-guard sums over "
            "every rank, so it supports partitions across the whole world only."
        )
    numel = int(param.ds_numel)  # type: ignore[attr-defined]
    size = part.numel()
    if size * world < numel:
        raise ValueError(
            f"unexpected ZeRO-3 partition: {size} elements on each of {world} ranks for a "
            f"tensor of {numel}."
        )
    start = min(rank * size, numel)
    held = max(min(size, numel - start), 0)
    shape = torch.Size(param.ds_shape)  # type: ignore[attr-defined]
    return LocalShard(part.detach().narrow(0, 0, held), start, numel, shape, True)


def local_shard(param: torch.Tensor) -> LocalShard:
    """This rank's shard of ``param`` (the whole tensor when it is not a sharded ``DTensor`` or
    a ZeRO-3 partition).

    Raises ``ValueError`` for layouts other than FSDP2's (one mesh dimension, ``Shard(0)`` or
    ``Replicate()``), e.g. tensor parallelism or HSDP, naming the placement, and for ZeRO-3
    partitions not held in memory as they are (NVMe offload, quantized weights, ZeRO++ hpZ).
    """
    if is_zero3(param):
        return _zero3_shard(param)
    dtensor = _dtensor_type()
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    if not isinstance(param, dtensor) and not isinstance(data, dtensor):
        return LocalShard(param.detach(), 0, param.numel(), param.shape, False)
    dt = param if isinstance(param, dtensor) else data
    placements = tuple(dt.placements)
    mesh = dt.device_mesh
    local = dt.to_local().detach()
    if len(placements) == 1 and placements[0].is_replicate():
        return LocalShard(local, 0, dt.numel(), dt.shape, False)
    if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
        raise ValueError(
            f"a parameter is laid out as {placements} on a {mesh.ndim}-D mesh; safety-guard "
            "moves FSDP2 shards (Shard(0) on a 1-D mesh) and replicated parameters only."
        )
    rows = dt.shape[0] if dt.dim() else 1
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = math.ceil(rows / world) if rows else 0
    start = min(rank * chunk, rows)
    row_numel = dt.numel() // rows if rows else 0
    expected = max(min(chunk, rows - start), 0) * row_numel
    if local.numel() != expected:
        raise ValueError(
            f"unexpected FSDP2 shard: rank {rank} holds {local.numel()} elements of a "
            f"{tuple(dt.shape)} tensor, expected {expected} (rows {start}…{start + chunk})."
        )
    return LocalShard(local, start * row_numel, dt.numel(), dt.shape, True)


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole (detached) tensor: gathered from every rank when it is an FSDP2 ``DTensor`` or a
    ZeRO-3 partition (a collective: every rank must call it for the same tensors in the same
    order).

    Example:
        >>> full_tensor(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    if is_zero3(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().clone()
    dtensor = _dtensor_type()
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    if isinstance(param, dtensor):
        return param.detach().full_tensor()
    if isinstance(data, dtensor):
        return data.full_tensor()
    return param.detach()


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module of ``model`` in its sharded state, and release every gathered
    ZeRO-3 parameter (no collective).

    FSDP2 registers the *unsharded* parameters on a module after its forward when it does not
    reshard after forward (the root module, by default), and the sharded ``DTensor`` ones
    otherwise; ZeRO-3 keeps its *persistent* parameters (the small ones) gathered between
    forwards and gathers them again only after they are released. Code that reads or moves
    shards calls this first, so that it sees the shards and the next forward all-gathers what it
    wrote, never a stale unsharded copy.
    """
    _release_zero3(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _release_zero3(model: torch.nn.Module) -> None:
    """Release the gathered copies of ZeRO-3 parameters (the partitions stay authoritative):
    all-gathers still in flight (prefetched by DeepSpeed's coordinator) are waited for first."""
    params = [p for p in model.parameters() if is_zero3(p)]
    if not params:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for module in model.modules():
        registry = getattr(module, "ds_inflight_param_registry", None)
        for param in list(registry or ()):
            registry.pop(param).wait()  # type: ignore[union-attr]
    inflight = [p for p in params if p.ds_status == ZeroParamStatus.INFLIGHT]
    busy = [
        p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE and p.ds_active_sub_modules
    ]
    if inflight or busy:
        raise RuntimeError(
            "ZeRO-3 parameters are being gathered or used by a forward pass "
            f"({(inflight or busy)[0].ds_summary()}); safety-guard reads and moves partitions "
            "between training steps only."
        )
    gathered = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
    if gathered:
        gathered[0].partition(gathered)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 across the ranks of the default process group (in place).

    Each decoder layer is its own FSDP2 unit (its weights all-gathered only for its forward),
    then the root: the layout ``accelerate``'s FSDP2 plugin gives a transformers model with
    ``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP``. Call after moving the model to this
    rank's device. Returns the model.

    Example:
        >>> shard_model(model)  # under torchrun, after init_process_group  # doctest: +SKIP
    """
    from torch.distributed.fsdp import fully_shard

    from .scoring import _layer_modules

    for layer in _layer_modules(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` has parameters sharded by FSDP2 or partitioned by ZeRO-3 (after
    :func:`reshard`)."""
    reshard(model)
    return is_sharded(model.parameters())


def is_sharded(params: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``params`` is sharded across ranks (every rank gives the same answer)."""
    return any(local_shard(p).sharded for p in params)


@torch.no_grad()
def sharded_norms(shards: Iterable[LocalShard], reduce: bool) -> list[float]:
    """Frobenius norms of the full tensors: local sums of squares, summed over ranks (float64).

    ``reduce``: whether to sum over ranks (pass :func:`is_sharded`; every rank must call).
    """
    local = [squared_distance(s.tensor, None) for s in shards]
    total = all_reduce_sum(local) if reduce else local
    return [math.sqrt(max(v, 0.0)) for v in total]


@torch.no_grad()
def values_at(shard: LocalShard, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, held): the full tensor's values at flat ``index`` where this rank holds them
    (float64, zero elsewhere), and the mask of those positions. Sum ``values`` over ranks to
    read every position."""
    held = (index >= shard.offset) & (index < shard.stop)
    values = torch.zeros(len(index), dtype=torch.float64)
    local = (index[held] - shard.offset).to(shard.tensor.device)
    if len(local):
        values[held] = shard.tensor.reshape(-1)[local].double().cpu()
    return values, held


@torch.no_grad()
def squared_distance(a: torch.Tensor, b: torch.Tensor | None) -> float:
    """Σ (a − b)² (Σ a² when ``b`` is None) in float64, chunk by chunk: no tensor-sized temporary.

    ``b`` may live on another device (e.g. θ₀ on the CPU); each chunk is moved to ``a``'s device.

    Example:
        >>> squared_distance(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0]))
        25.0
    """
    flat_a = a.detach().reshape(-1)
    flat_b = b.detach().reshape(-1) if b is not None else None
    total = 0.0
    for start in range(0, flat_a.numel(), _CHUNK):
        chunk = flat_a[start : start + _CHUNK].double()
        if flat_b is not None:
            chunk = chunk - flat_b[start : start + _CHUNK].to(chunk.device, torch.float64)
        total += float(chunk.pow(2).sum())
    return total
