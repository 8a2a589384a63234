"""Shard-local views of parameters sharded by FSDP2 (``fully_shard``: ``DTensor`` on dim 0), by
FSDP (``FullyShardedDataParallel`` with ``use_orig_params=True``) or partitioned by DeepSpeed
ZeRO-3.

The guard's moves are elementwise in parameter space (θ₀ + s·δ), so a rank can keep θ₀ for its
own shard only and move its shard in place; norms and sampled values are per-shard partial
results summed over ranks. :func:`local_shard` says which slice of the full (flattened) tensor a
rank holds: FSDP2 splits dim 0 in ``ceil(rows / world)``-row chunks, ZeRO-3 the flattened tensor
(padded to a multiple of the world size) in equal partitions, FSDP the concatenation of a unit's
flattened parameters (its flat parameter), so each original parameter's part of a rank's shard is
one contiguous range of its row-major flattening too. A ZeRO-3 parameter is empty outside its
module's forward, so it always reads as sharded (also on one rank); :func:`reshard` releases the
gathered copies ZeRO-3 keeps (its *persistent* small parameters) and puts FSDP units back in their
sharded state, so that the next forward gathers what was written to the shards.

Example:
    >>> import torch
    >>> shard = local_shard(torch.nn.Parameter(torch.ones(4, 2)))  # not sharded: all of it
    >>> shard.offset, shard.numel, shard.sharded
    (0, 8, False)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from safety_guard.engines.collectives import all_reduce_bits, all_reduce_sum
from safety_guard.models.wrappers import decoder_layers

__all__ = [
    "SUPPORTED_ENGINES",
    "LocalShard",
    "UnsupportedEngineError",
    "fsdp1_problem",
    "fsdp1_shards",
    "fsdp1_units",
    "full_shape",
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

#: The attribute :func:`reshard` sets on each original parameter of an FSDP (1) unit: its place
#: in the unit's flat parameter (FSDP keeps no way back from a parameter to its unit).
_FSDP1_SLOT = "_safety_guard_fsdp1_slot"

#: FSDP (1) sharding strategies whose shards span the whole world (or that do not shard).
_FSDP1_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


#: What safety-guard moves and measures today (see :func:`check_engine`).
SUPPORTED_ENGINES = (
    "one process, DDP or DataParallel (torchrun / accelerate launch with DDP), torch.compile, "
    "FSDP2 (fully_shard), FSDP (FullyShardedDataParallel with use_orig_params=True, "
    "FULL_SHARD, SHARD_GRAD_OP or NO_SHARD) and DeepSpeed ZeRO-3 for the guard, full "
    "finetuning or PEFT adapters on floating-point or bitsandbytes-quantized (QLoRA) base "
    "weights"
)


class UnsupportedEngineError(ValueError):
    """The model's weights are sharded or quantized in a way safety-guard cannot move yet."""

    @classmethod
    def naming(cls, engine: str) -> UnsupportedEngineError:
        """The error for ``engine``, with the supported engines."""
        return cls(
            f"safety-guard cannot move or measure this model's weights yet: {engine}. Supported: "
            f"{SUPPORTED_ENGINES}."
        )


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


@dataclass(frozen=True)
class _Fsdp1Slot:
    """Where an FSDP (1) original parameter lives: its unit's ``FlatParamHandle`` and its index
    in the unit's flat parameter."""

    handle: Any
    index: int


def fsdp1_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP (1) units in ``model`` (``FullyShardedDataParallel`` modules), outermost first."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def fsdp1_problem(units: Sequence[torch.nn.Module]) -> str | None:
    """Why safety-guard cannot move the parameters of these FSDP (1) units (:func:`fsdp1_units`
    of a model), naming the setting to change (``None``: it can, or there is none).

    Supported: ``use_orig_params=True`` (in accelerate's config ``fsdp_use_orig_params: true``)
    with ``FULL_SHARD``, ``SHARD_GRAD_OP`` or ``NO_SHARD`` over the whole world.
    """
    import torch.distributed as dist

    for unit in units:
        if not getattr(unit, "_use_orig_params", False):
            return (
                "FSDP (FullyShardedDataParallel) with use_orig_params=False, whose parameters "
                "are flattened into one per unit; set `fsdp_use_orig_params: true` in "
                "accelerate's FSDP config (use_orig_params=True), or use FSDP2 "
                "(`fsdp_version: 2`)"
            )
        strategy = getattr(unit.sharding_strategy, "name", str(unit.sharding_strategy))
        if strategy not in _FSDP1_STRATEGIES:
            return (
                f"FSDP with sharding strategy {strategy} (shards within a group of ranks, "
                f"replicas across groups); use one of {', '.join(_FSDP1_STRATEGIES)}, or FSDP2"
            )
        group = getattr(unit, "process_group", None)
        if strategy != "NO_SHARD" and dist.get_world_size(group) != dist.get_world_size():
            return (
                f"FSDP units sharded across {dist.get_world_size(group)} of the "
                f"{dist.get_world_size()} ranks (a custom process group); safety-guard sums over "
                "every rank, so it supports shards across the whole world only"
            )
        handle = getattr(unit, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if handle is not None and not all(
            hasattr(flat, a) for a in ("_params", "_shapes", "_shard_param_infos")
        ):
            return (
                f"FSDP of torch {torch.__version__}, whose flat parameters do not expose the "
                "layout safety-guard reads (_params, _shapes, _shard_param_infos: read on torch "
                "2.13); use FSDP2 (`fsdp_version: 2`)"
            )
    return None


def fsdp1_shards(units: Sequence[torch.nn.Module]) -> bool:
    """Whether one of these FSDP (1) units shards its parameters (``NO_SHARD``, which FSDP also
    picks on one rank, leaves whole tensors: plain code reads them right)."""
    return any(getattr(u.sharding_strategy, "name", "") != "NO_SHARD" for u in units)


def _reshard_fsdp1(model: torch.nn.Module) -> None:
    """Put every FSDP (1) unit in its sharded state and mark its original parameters with their
    :class:`_Fsdp1Slot` (no collective).

    FSDP does not free the root unit's gathered flat parameter after a forward (its backward
    comes next): with gradients enabled its parameters stay views of that copy, and either way
    the next forward uses the copy instead of gathering the shards, so what was written to the
    shards would not be seen. Freeing it makes the next forward gather them.
    """
    units = fsdp1_units(model)
    if not any(getattr(u, "_handle", None) is not None for u in units):
        return
    problem = fsdp1_problem(units)
    if problem is not None:
        raise UnsupportedEngineError.naming(problem)
    from torch.distributed.fsdp._flat_param import HandleTrainingState

    for unit in units:
        handle = unit._handle
        if handle is None:  # a unit without parameters of its own
            continue
        if handle._training_state != HandleTrainingState.IDLE:
            raise RuntimeError(
                f"an FSDP unit is in its {handle._training_state.name} state; safety-guard "
                "reads and moves shards between training steps only."
            )
        # before the first forward (FSDP's lazy init) nothing was gathered
        initialized = hasattr(handle.flat_param, "_full_param_padded")
        if handle.uses_sharded_strategy and initialized and not handle.needs_unshard():
            # gathered, or back on its shard with the gathered copy kept (the root after a
            # forward): free it, so that the next forward gathers the shards again
            handle.reshard(True)
            handle.post_reshard()
            handle._prefetched = False
        # (a tied weight is one parameter object, listed once: FSDP keeps the originals)
        for index, param in enumerate(handle.flat_param._params):
            setattr(param, _FSDP1_SLOT, _Fsdp1Slot(handle, index))


def _is_fsdp1(param: torch.Tensor) -> bool:
    """Whether ``param`` is an original parameter FSDP (1) flattened into a unit's flat one."""
    return getattr(param, "_fsdp_flattened", False)


def _fsdp1_shard(param: torch.Tensor) -> LocalShard:
    """This rank's part of an FSDP (1) original parameter (a 1-D view of its unit's flat shard)."""
    slot = getattr(param, _FSDP1_SLOT, None)
    if slot is None:
        raise RuntimeError(
            "an FSDP parameter was read before safety_guard.engines.shards.reshard(model) located it in "
            "its unit's flat parameter; call reshard(model) first."
        )
    handle, flat = slot.handle, slot.handle.flat_param
    shape = torch.Size(flat._shapes[slot.index])
    local = param.detach()
    if not handle.uses_sharded_strategy:  # NO_SHARD: whole views of the flat parameter
        return LocalShard(local, 0, shape.numel(), shape, False)
    info = flat._shard_param_infos[slot.index]
    held = info.numel_in_shard if info.in_shard else 0
    if not handle.is_sharded(flat) or local.numel() != held:
        raise RuntimeError(
            f"an FSDP parameter of shape {tuple(shape)} holds {local.numel()} elements where its "
            f"shard has {held}: its unit was gathered after safety_guard.engines.shards.reshard(model); "
            "call it again before reading shards."
        )
    offset = info.intra_param_start_idx if info.in_shard else 0
    return LocalShard(local.reshape(-1), offset, shape.numel(), shape, True)


def full_shape(param: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor ``param`` is (a part of): its global shape for an FSDP2
    ``DTensor``, a ZeRO-3 partition or an FSDP (1) shard (after :func:`reshard`).

    Example:
        >>> full_shape(torch.ones(3, 2))
        torch.Size([3, 2])
    """
    ds_shape = getattr(param, "ds_shape", None)
    if ds_shape is not None:
        return torch.Size(ds_shape)
    if getattr(param, _FSDP1_SLOT, None) is not None:
        return _fsdp1_shard(param).shape
    return param.shape


def local_shard(param: torch.Tensor) -> LocalShard:
    """This rank's shard of ``param`` (the whole tensor when it is not a sharded ``DTensor`` or
    a ZeRO-3 partition).

    Raises ``ValueError`` for layouts other than FSDP2's (one mesh dimension, ``Shard(0)`` or
    ``Replicate()``), e.g. tensor parallelism or HSDP, naming the placement, and for ZeRO-3
    partitions not held in memory as they are (NVMe offload, quantized weights, ZeRO++ hpZ).
    """
    if is_zero3(param):
        return _zero3_shard(param)
    if _is_fsdp1(param):
        return _fsdp1_shard(param)
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
    """The whole (detached) tensor: gathered from every rank when it is an FSDP2 ``DTensor``, a
    ZeRO-3 partition or an FSDP (1) shard (a collective: every rank must call it for the same
    tensors in the same order). Bit for bit: an FSDP shard is gathered as raw bytes.

    Example:
        >>> full_tensor(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    if is_zero3(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().clone()
    if _is_fsdp1(param):
        shard = _fsdp1_shard(param)
        if not shard.sharded:
            return shard.tensor.view(shard.shape)
        whole = torch.zeros(shard.numel, dtype=shard.tensor.dtype, device=shard.tensor.device)
        whole[shard.offset : shard.stop] = shard.tensor
        return all_reduce_bits(whole).view(shard.shape)  # one rank holds each element
    dtensor = _dtensor_type()
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    if isinstance(param, dtensor):
        return param.detach().full_tensor()
    if isinstance(data, dtensor):
        return data.full_tensor()
    return param.detach()


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module and FSDP (1) unit of ``model`` in its sharded state, and release
    every gathered ZeRO-3 parameter (no collective).

    FSDP2 registers the *unsharded* parameters on a module after its forward when it does not
    reshard after forward (the root module, by default), and the sharded ``DTensor`` ones
    otherwise; ZeRO-3 keeps its *persistent* parameters (the small ones) gathered between
    forwards and gathers them again only after they are released. Code that reads or moves
    shards calls this first, so that it sees the shards and the next forward all-gathers what it
    wrote, never a stale unsharded copy.
    """
    _release_zero3(model)
    _reshard_fsdp1(model)
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

    for layer in decoder_layers(model):
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
