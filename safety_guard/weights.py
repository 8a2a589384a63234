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

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .distributed import all_reduce_sum
from .quantized import dense_numel, dense_weight, is_quantized
from .shards import fsdp1_problem, fsdp1_shards, fsdp1_units

__all__ = [
    "DEFAULT_NORM_CLASS_PATTERN",
    "ParameterSelection",
    "UnsupportedEngineError",
    "canonical_name",
    "check_engine",
    "check_finite",
    "compare_fingerprints",
    "is_norm_module",
    "model_fingerprint",
    "named_canonical_parameters",
    "perturbable_parameters",
    "unwrap_model",
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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain transformers model inside DDP/FSDP/``torch.compile``/PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif _is_peft_model(model):
            model = model.get_base_model()
        else:
            return model


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a declared dependency
        return False
    return isinstance(model, PeftModel)


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
    (:mod:`safety_guard.shards`). ``allow_quantized``: bitsandbytes base weights are allowed —
    for the code that only reads them (:mod:`safety_guard.quantized`).

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
    read them through :func:`~safety_guard.quantized.dense_weight`).
    """
    if allow_sharded:  # FSDP2: the shards, not a stale unsharded copy (see shards.reshard)
        from .shards import reshard

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


# -- fingerprints -------------------------------------------------------------------------------

_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "use_cache",
    "_attn_implementation_autoset",
    "_attn_implementation",
    "attn_implementation",
    "architectures",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "pad_token_id",
    "_commit_hash",
}
_ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)
_N_SAMPLES = 16


def _sample_index(numel: int) -> torch.Tensor:
    # float64: float32 positions round past the end for tensors over 2**24 elements
    idx = torch.linspace(0, numel - 1, steps=min(_N_SAMPLES, numel), dtype=torch.float64)
    return idx.round().long().clamp_(0, numel - 1)


def _sample_values(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1)
    idx = _sample_index(flat.numel()).to(flat.device)
    return [float(v) for v in flat[idx].float().cpu()]


def model_fingerprint(model: nn.Module, num_tensors: int = 4) -> dict[str, Any]:
    """A dtype-independent fingerprint: architecture config plus norms and samples of a few tensors.

    Values are compared with a tolerance (see :func:`compare_fingerprints`), so the same weights
    loaded in fp32 or bf16, on CPU or GPU, with or without a LoRA wrapper, match; another
    checkpoint of the same architecture does not. FSDP2 shards are read as the whole tensors
    (partial norms and samples summed over ranks); bitsandbytes-quantized weights dequantized
    one tensor at a time, and the fingerprint says ``"quantized": true`` (their values are
    those of the full-precision model only up to the quantization error, see
    :func:`compare_fingerprints`). Other engines are refused (:func:`check_engine`).
    """
    from .shards import is_sharded, local_shard, reshard, sharded_norms, values_at

    reshard(model)
    check_engine(model, allow_sharded=True, allow_quantized=True)
    root = unwrap_model(model)
    config = getattr(root, "config", None)
    arch: dict[str, Any] = {}
    if config is not None:
        cfg = config.to_dict()
        arch = {k: cfg.get(k) for k in _ARCH_KEYS if k in cfg}
    params = [
        (n, p)
        for n, p in named_canonical_parameters(model)
        if p.is_floating_point() or is_quantized(p)
    ]
    quantized = any(is_quantized(p) for _, p in params)
    picks = sorted(
        {round(i * (len(params) - 1) / max(num_tensors - 1, 1)) for i in range(num_tensors)}
    )
    tensors = []
    sharded = is_sharded(p for _, p in params)  # FSDP2: partial norms and samples, summed
    for i in picks if params else []:
        name, param = params[i]
        if is_quantized(param):
            dense = dense_weight(param)
            tensors.append(
                {
                    "name": name,
                    "shape": list(dense.shape),
                    "norm": sharded_norms([local_shard(dense)], False)[0],
                    "samples": _sample_values(dense),
                }
            )
            del dense
            continue
        shard = local_shard(param)
        if sharded:
            samples, _ = values_at(shard, _sample_index(shard.numel))
            samples = [float(torch.tensor(v).float()) for v in all_reduce_sum(samples.tolist())]
        else:
            samples = _sample_values(param)
        tensors.append(
            {
                "name": name,
                "shape": list(shard.shape),
                "norm": sharded_norms([shard], sharded)[0],
                "samples": samples,
            }
        )
    out = {
        "architecture": arch,
        "num_parameters": int(sum(dense_numel(p) for _, p in params)),
        "tensors": tensors,
    }
    if quantized:
        out["quantized"] = True
    return out


def compare_fingerprints(
    expected: dict[str, Any], actual: dict[str, Any], rtol: float = 2e-2, atol: float = 1e-3
) -> list[str]:
    """Differences between two fingerprints, as human-readable lines (empty when they match).

    When either model is quantized (QLoRA's base), values match only up to the quantization
    error: norms are compared within 5 % and sampled values are not compared (the architecture,
    the parameter count, the tensors' names and shapes still are).
    """
    problems = []
    quantized = bool(expected.get("quantized") or actual.get("quantized"))
    if quantized:
        rtol = max(rtol, 5e-2)
    for key in sorted(set(expected.get("architecture", {})) | set(actual.get("architecture", {}))):
        a, b = expected.get("architecture", {}).get(key), actual.get("architecture", {}).get(key)
        if a != b:
            problems.append(f"config {key}: file has {a!r}, model has {b!r}")
    if expected.get("num_parameters") != actual.get("num_parameters"):
        problems.append(
            f"parameter count: file has {expected.get('num_parameters')}, "
            f"model has {actual.get('num_parameters')}"
        )
    actual_tensors = {t["name"]: t for t in actual.get("tensors", [])}
    for t in expected.get("tensors", []):
        other = actual_tensors.get(t["name"])
        if other is None:
            problems.append(f"tensor {t['name']}: missing from the model")
            continue
        if other["shape"] != t["shape"]:
            problems.append(f"tensor {t['name']}: shape {t['shape']} vs {other['shape']}")
            continue
        if not math.isclose(t["norm"], other["norm"], rel_tol=rtol, abs_tol=atol):
            problems.append(f"tensor {t['name']}: norm {t['norm']:.6g} vs {other['norm']:.6g}")
            continue
        if quantized:
            continue
        scale = max(abs(v) for v in t["samples"]) if t["samples"] else 1.0
        for a, b in zip(t["samples"], other["samples"], strict=False):
            if abs(a - b) > atol * scale + rtol * abs(a) + 1e-8:
                problems.append(f"tensor {t['name']}: sampled values differ ({a:.6g} vs {b:.6g})")
                break
    return problems
