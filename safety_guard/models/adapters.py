"""PEFT LoRA adapters of a model being finetuned: find, copy, load back and write them.

Each works on every engine the guard supports: a plain or DDP-wrapped model, FSDP2 DTensors,
FSDP (1) flat shards and DeepSpeed ZeRO-3 partitions (:mod:`safety_guard.engines.shards`).

Example:
    >>> from safety_guard.models.adapters import adapter_copy, is_lora, load_adapter
    >>> saved = adapter_copy(model) if is_lora(model) else None  # doctest: +SKIP
    >>> load_adapter(model, saved)  # bit-exact  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from safety_guard.engines.shards import full_tensor, local_shard, reshard
from safety_guard.models.parameters import canonical_name, unwrap_model

__all__ = [
    "adapter_copy",
    "adapter_tensors",
    "full_adapter",
    "is_lora",
    "load_adapter",
    "peft_model",
    "trainable_finite",
    "write_adapter",
]


def is_lora(model: nn.Module) -> bool:
    """Whether the model holds PEFT LoRA layers (through DDP/FSDP/PEFT wrappers).

    Example:
        >>> is_lora(torch.nn.Linear(2, 2))
        False
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a declared dependency
        return False
    return any(isinstance(m, LoraLayer) for m in unwrap_model(model).modules())


def peft_model(model: nn.Module) -> nn.Module:
    """The ``PeftModel`` inside DDP-style wrappers (``.module``); the model itself otherwise."""
    from peft import PeftModel

    while not isinstance(model, PeftModel) and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = model.module
    return model


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapter's tensors, keyed as in ``adapter_model.safetensors``: the parameters
    themselves (DTensors under FSDP2, ZeRO-3 parameters with their partitions, 1-D shards under
    FSDP; resharded first). Read from ``named_parameters``, not ``state_dict``: FSDP's state-dict
    hooks would gather every weight of the model."""
    from peft import get_peft_model_state_dict

    reshard(model)
    inner = peft_model(model)
    # (PEFT finds the adapter's keys from the module names, FSDP's wrapper names included)
    tensors = get_peft_model_state_dict(inner, state_dict=dict(inner.named_parameters()))
    return {canonical_name(k): v for k, v in tensors.items()}


def adapter_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the LoRA adapter (a few MB), keyed as in ``adapter_model.safetensors``;
    this rank's shards of it under FSDP2, FSDP and ZeRO-3."""
    return {
        k: local_shard(v).tensor.to("cpu", copy=True) for k, v in adapter_tensors(model).items()
    }


def full_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter on the CPU, gathered from every rank when sharded (a collective: every
    rank calls it)."""
    return {k: full_tensor(v).to("cpu", copy=True) for k, v in adapter_tensors(model).items()}


@torch.no_grad()
def load_adapter(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Load an :func:`adapter_copy`, or a saved adapter file's tensors, back into the model's
    parameters, bit-exactly (when sharded, each rank takes its shard's range of a whole tensor;
    ZeRO-3's optimizer also gets it in its fp32 copy of the partition, which the next step and
    its checkpoints start from).

    Raises:
        ValueError: ``saved`` lacks some of the model's LoRA tensors (another configuration).
    """
    current = adapter_tensors(model)
    missing = sorted(set(current) - set(saved))
    if missing:
        raise ValueError(
            f"the saved adapter lacks {len(missing)} of the model's LoRA tensors (e.g. "
            f"{missing[0]}): it was saved from another adapter configuration."
        )
    for key, param in current.items():
        shard = local_shard(param)
        source = saved[key].reshape(-1)
        if shard.sharded and source.numel() == shard.numel:  # a whole tensor: take our range
            source = source[shard.offset : shard.stop]
        shard.tensor.copy_(source.view(shard.tensor.shape))
        optimizer = getattr(param, "_z3_optimizer", None)
        if optimizer is not None:
            optimizer.set_local_hp_param(param.ds_tensor, param)


def write_adapter(model: nn.Module, adapter: dict[str, torch.Tensor], folder: Path) -> None:
    """Write a gathered adapter as ``save_pretrained`` does (config + ``adapter_model.safetensors``):
    ``PeftModel.from_pretrained(base, folder)`` loads it."""
    from safetensors.torch import save_file

    inner = peft_model(model)
    inner.peft_config[inner.active_adapter].save_pretrained(str(folder))
    save_file(
        {k: v.contiguous() for k, v in adapter.items()},
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


@torch.no_grad()
def trainable_finite(model: nn.Module) -> bool:
    """Whether every trainable parameter is finite (chunked: no tensor-sized temporary; this
    rank's shard when sharded).

    Example:
        >>> trainable_finite(torch.nn.Linear(2, 2))
        True
    """
    step = 1 << 22
    reshard(model)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        flat = local_shard(p).tensor.reshape(-1)
        for i in range(0, flat.numel(), step):
            if not bool(torch.isfinite(flat[i : i + step]).all()):
                return False
    return True
