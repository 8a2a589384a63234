"""The model inside its wrappers: the bottom layer every other module may use.

DDP, DataParallel, ``torch.compile`` and PEFT wrap the transformers model; these helpers find it,
its decoder layers and its device, and import nothing else of safety-guard.

Example:
    >>> import torch
    >>> unwrap_model(torch.nn.DataParallel(torch.nn.Linear(2, 2))).__class__.__name__
    'Linear'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["decoder_layers", "dtype_name", "is_peft_model", "model_device", "unwrap_model"]


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a declared dependency
        return False
    return isinstance(model, PeftModel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain transformers model inside DDP/FSDP/``torch.compile``/PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif is_peft_model(model):
            model = model.get_base_model()
        else:
            return model


def decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The decoder layers (``model.model.layers``) of a Llama-style causal LM.

    Raises:
        ValueError: the model has no such list.
    """
    root = unwrap_model(model)
    inner = getattr(root, "model", root)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(root).__name__} has no `.model.layers`; the hidden-state score needs a "
            "decoder-layer list (Llama, Mistral, Qwen, Gemma ...)."
        )
    return layers


def dtype_name(model: nn.Module) -> str | None:
    """The dtype of the model's first floating-point parameter, without ``torch.`` (None when
    it has none).

    Example:
        >>> dtype_name(torch.nn.Linear(2, 2).to(torch.bfloat16))
        'bfloat16'
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first materialized parameter (CPU when it has none).

    Example:
        >>> model_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return torch.device("cpu")
