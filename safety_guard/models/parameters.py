"""Which weights a landscape moves, under which names, and how to recognise a model again.

Parameters are addressed by a *canonical name*: the name the parameter has in the plain
transformers model. A PEFT wrapper (``base_model.model.`` prefix, ``.base_layer`` inside LoRA
layers) does not change it, so a landscape computed on the aligned model applies unchanged to the
same model wrapped for LoRA training.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    >>> names = [name for name, _ in perturbable_parameters(model)]
    >>> "model.norm.weight" in names, "model.layers.0.mlp.up_proj.weight" in names
    (False, True)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from safety_guard.engines.shards import (
    UnsupportedEngineError,
    fsdp1_problem,
    fsdp1_shards,
    fsdp1_units,
    reshard,
)
from safety_guard.models.quantized import is_quantized
from safety_guard.models.wrappers import unwrap_model

__all__ = [
    "DEFAULT_NORM_CLASS_PATTERN",
    "ParameterSelection",
    "UnsupportedEngineError",
    "canonical_name",
    "check_engine",
    "check_finite",
    "is_norm_module",
    "named_canonical_parameters",
    "perturbable_parameters",
]

#: Module classes whose name matches this pattern count as normalization layers, next to the
#: torch classes below. Transformers defines its own norm classes per architecture
#: (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``T5LayerNorm`` ...) that do not subclass torch's.
DEFAULT_NORM_CLASS_PATTERN = (
    r"(RMSNorm|LayerNorm|GroupNorm|BatchNorm[123]?d?|InstanceNorm[123]?d?)$"
)

_TORCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm_module(
    module: nn.Module, class_pattern: str | None = DEFAULT_NORM_CLASS_PATTERN
) -> bool:
    """Whether ``module`` is a normalization layer, by its type.

    Example:
        >>> is_norm_module(torch.nn.LayerNorm(4)), is_norm_module(torch.nn.Linear(2, 2))
        (True, False)
    """
    if isinstance(module, _TORCH_NORM_TYPES):
        return True
    return bool(class_pattern) and re.search(class_pattern, type(module).__name__) is not None


def _tuner_layer_types() -> tuple[type, ...]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover
        return ()
    return (BaseTunerLayer, ModulesToSaveWrapper)


#: Module names FSDP (1) and activation checkpointing insert between a module and its children.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """``name`` without the module names that wrappers insert in it (FSDP's
    ``_fsdp_wrapped_module``, activation checkpointing's ``_checkpoint_wrapped_module``,
    ``torch.compile``'s ``_orig_mod``): the name the parameter or module has in the plain model.

    Example:
        >>> canonical_name("layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.weight")
        'layers.0.mlp.weight'
    """
    for prefix in _WRAPPER_PREFIXES:
        if prefix in name:
            name = name.replace(prefix, "")
    return name


def named_canonical_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(canonical_name, parameter)`` for the model's *base* weights.

    Tied weights appear once. PEFT adapter weights (``lora_A``, ``lora_B`` ...) and the trainable
    copies of ``modules_to_save`` are skipped; the frozen base weights inside a LoRA layer keep the
    name they have in the unwrapped model.
    """
    root = unwrap_model(model)
    tuner_types = _tuner_layer_types()
    skip: set[int] = set()
    renames: dict[str, str] = {}
    if tuner_types:
        base_tuner, save_wrapper = tuner_types
        for name, module in root.named_modules():
            if isinstance(module, base_tuner):
                for layer_name in module.adapter_layer_names:
                    sub = getattr(module, layer_name, None)
                    if isinstance(sub, nn.Module):
                        skip.update(id(p) for p in sub.parameters())
                renames[f"{name}.base_layer."] = f"{name}."
            elif isinstance(module, save_wrapper):
                skip.update(id(p) for p in module.modules_to_save.parameters())
                renames[f"{name}.original_module."] = f"{name}."
    for name, param in root.named_parameters():
        if id(param) in skip:
            continue
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        yield canonical_name(name), param


@dataclass
class ParameterSelection:
    """Which parameters a direction moves.

    Args:
        exclude_norm: give normalization layers (found by module type) a zero direction.
        norm_class_pattern: regular expression on module class names that also counts as a norm.
        exclude: regular expressions on canonical parameter names to leave unperturbed.
        include: if given, only parameters matching one of these are perturbed.
    """

    exclude_norm: bool = field(default=True, metadata={"help": "Zero direction for norm layers."})
    norm_class_pattern: str | None = field(
        default=DEFAULT_NORM_CLASS_PATTERN,
        metadata={"help": "Regex on module class names that marks extra normalization layers."},
    )
    exclude: Sequence[str] = field(
        default=(), metadata={"help": "Regexes on parameter names to leave unperturbed."}
    )
    include: Sequence[str] | None = field(
        default=None, metadata={"help": "If set, only parameters matching one of these regexes."}
    )

    def __post_init__(self) -> None:
        for pattern in [*self.exclude, *(self.include or ())]:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"Invalid parameter-name regex {pattern!r}: {err}. Pass Python regular "
                    "expressions, e.g. 'lm_head' or r'layers\\.0\\.'."
                ) from err
        self.exclude = tuple(self.exclude)
        self.include = tuple(self.include) if self.include is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "exclude_norm": self.exclude_norm,
            "norm_class_pattern": self.norm_class_pattern,
            "exclude": list(self.exclude),
            "include": list(self.include) if self.include is not None else None,
        }


def check_engine(
    model: nn.Module, allow_sharded: bool = False, allow_quantized: bool = False
) -> None:
    """Refuse models whose parameters safety-guard would read wrong, naming the engine.

    FSDP (1 and 2) and DeepSpeed ZeRO-3 leave each rank a shard of every weight, and bitsandbytes
    stores quantized base weights as integers: a displacement, a landscape or a fingerprint
    computed on them would be a wrong number (an empty ZeRO-3 parameter reads 0), so they are
    refused with the engine's name until they are supported.

    ``allow_sharded``: FSDP2 parameters (``DTensor``), FSDP (1) parameters (``use_orig_params``)
    and ZeRO-3 partitions are allowed — for the code that moves them shard by shard
    (:mod:`safety_guard.engines.shards`). ``allow_quantized``: bitsandbytes base weights are allowed —
    for the code that only reads them (:mod:`safety_guard.models.quantized`).

    Example:
        >>> check_engine(torch.nn.Linear(2, 2))  # plain floating-point weights: fine
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    engine = None
    units = fsdp1_units(model)
    if units:
        engine = fsdp1_problem(units)
        if engine is None and not allow_sharded and fsdp1_shards(units):
            engine = (
                "FSDP (FullyShardedDataParallel; its shards are moved by shard-aware code only)"
            )
    for name, param in model.named_parameters():
        if engine is not None:
            break
        if isinstance(param, DTensor) or isinstance(param.data, DTensor):
            if allow_sharded:
                continue
            engine = f"FSDP2 / DTensor parameters (fully_shard or tensor parallel; e.g. {name})"
        elif hasattr(param, "ds_id"):  # DeepSpeed marks the parameters it partitions
            part = getattr(param, "ds_tensor", None)
            floating = part is not None and part.is_floating_point() and not is_quantized(param)
            if allow_sharded and floating:
                continue
            engine = f"DeepSpeed ZeRO-3 (partitioned parameters; e.g. {name})"
            if part is not None and not floating:
                engine = f"DeepSpeed ZeRO-3 partitions of quantized weights (e.g. {name})"
        elif hasattr(param, "quant_state") or hasattr(param, "SCB"):
            if allow_quantized and is_quantized(param):
                continue
            engine = (
                f"bitsandbytes-quantized base weights (e.g. {name}); a quantized model cannot "
                "be moved: compute its landscape on the unquantized model (e.g. bf16), and "
                "guard QLoRA finetunes (LoRA adapters on the quantized base) with it"
            )
        elif not param.is_floating_point():
            engine = f"quantized base weights ({name} is {str(param.dtype).removeprefix('torch.')})"
    if engine is not None:
        raise UnsupportedEngineError.naming(engine)


def perturbable_parameters(
    model: nn.Module,
    selection: ParameterSelection | None = None,
    *,
    allow_sharded: bool = False,
    allow_quantized: bool = False,
) -> list[tuple[str, nn.Parameter]]:
    """The ``(canonical_name, parameter)`` pairs a random direction moves, in model order.

    Raises :class:`UnsupportedEngineError` for sharded or quantized weights (:func:`check_engine`;
    ``allow_sharded``: sharded parameters (FSDP2, FSDP, ZeRO-3) are returned, for shard-aware
    callers; ``allow_quantized``: bitsandbytes base weights are returned, for callers that only
    read them through :func:`~safety_guard.models.quantized.dense_weight`).
    """
    if allow_sharded:  # FSDP2: the shards, not a stale unsharded copy (see shards.reshard)
        reshard(model)
    check_engine(model, allow_sharded, allow_quantized)
    selection = selection or ParameterSelection()
    root = unwrap_model(model)
    norm_params: set[int] = set()
    if selection.exclude_norm:
        for module in root.modules():
            if is_norm_module(module, selection.norm_class_pattern):
                norm_params.update(id(p) for p in module.parameters(recurse=False))
    out = []
    for name, param in named_canonical_parameters(model):
        if id(param) in norm_params:
            continue
        if any(re.search(p, name) for p in selection.exclude):
            continue
        if selection.include is not None and not any(re.search(p, name) for p in selection.include):
            continue
        out.append((name, param))
    return out


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise ``ValueError`` naming the first tensor that holds NaN or inf."""
    for name, tensor in named_tensors:
        flat = tensor.detach().reshape(-1)
        step = 1 << 20  # chunks: isfinite on a whole tensor allocates several tensor-sized temps
        if not all(
            bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step)
        ):
            raise ValueError(
                f"Parameter {name!r} contains NaN or inf values; the model is already broken, "
                "so no landscape can be measured around it. Reload the checkpoint (and check the "
                "dtype: fp16 overflows are a common cause)."
            )
