"""bitsandbytes-quantized base weights (QLoRA), read one tensor at a time.

A QLoRA finetune trains LoRA adapters on a base stored in 4 bits (``Params4bit``: packed
``uint8`` data and a ``quant_state`` holding the real shape and scales) or 8 bits
(``Int8Params``: ``int8`` data and row scales ``SCB``). The guard never moves the base — its
lookahead scales the adapters — but it needs each base weight's shape and norm (the displacement
is layer-normalized), and the fingerprint that checks a landscape file reads a few of them.
:func:`dense_weight` dequantizes one tensor for that; the whole base is never dequantized.

Example:
    >>> import torch

from safety_guard.engines.shards import full_shape
    >>> w = torch.nn.Parameter(torch.ones(2, 3))
    >>> is_quantized(w), tuple(dense_shape(w)), float(dense_weight(w).sum())
    (False, (2, 3), 6.0)
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from safety_guard.engines.shards import full_shape

__all__ = ["dense_numel", "dense_shape", "dense_weight", "is_quantized"]


def is_quantized(param: torch.Tensor) -> bool:
    """Whether ``param`` is a bitsandbytes-quantized weight (4-bit or 8-bit)."""
    return (
        getattr(param, "quant_state", None) is not None or getattr(param, "SCB", None) is not None
    )


def dense_shape(param: torch.Tensor) -> torch.Size:
    """The shape of the weight ``param`` stands for (its packed shape differs for 4-bit; a
    ZeRO-3 parameter is empty outside its module's forward, an FSDP shard is 1-D)."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        return torch.Size(state.shape)
    return full_shape(param)


def dense_numel(param: torch.Tensor) -> int:
    """Elements of the weight ``param`` stands for."""
    return dense_shape(param).numel()


@torch.no_grad()
def dense_weight(param: torch.Tensor) -> torch.Tensor:
    """The weight ``param`` stands for, dequantized (one tensor's worth of memory); plain
    tensors are returned as they are."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        from bitsandbytes.functional import dequantize_4bit

        data = param.data
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpacked_for_cpu(data, state)
        return dequantize_4bit(data, state)
    scales = getattr(param, "SCB", None)
    if scales is not None:  # LLM.int8: int8 rows scaled by their absmax / 127
        return param.data.float() * (scales.float().unsqueeze(1) / 127.0)
    return param.detach()


def _unpacked_for_cpu(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """A 4-bit weight in bitsandbytes' layout for its AVX512-BF16 CPU kernels, which it switches
    to at the first inference forward on such a CPU (another element order, absmax transposed
    to bf16), back in the standard layout: copies, the parameter is left as it is.

    bitsandbytes' own inverse restores the absmax order only for nested (double) quantization;
    it is put back here otherwise (bf16-rounded: dequantized values within 0.4 %).
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    nested = getattr(state, "original_nested", False)
    data, state = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
    if not nested:  # [blocks per row, rows] → the flat row-major blocks
        state.absmax = state.absmax.T.reshape(-1).float()
    return data, state
