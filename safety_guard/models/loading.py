"""Load a causal LM and its tokenizer from a folder, a hub id or a GGUF file, with clear errors.

Example:
    >>> model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safety_guard._extras import require

__all__ = ["load_model", "resolve_device", "resolve_dtype"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` → ``torch.bfloat16`` (also fp32/float32, fp16/float16).

    Example:
        >>> resolve_dtype("bf16")
        torch.bfloat16
    """
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {sorted(_DTYPES)}.") from None


#: The devices ``--device`` / ``load_model(device=...)`` accept.
DEVICES = "auto, cpu, cuda, cuda:N (N: the GPU index) or mps"


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; else one of :data:`DEVICES`, checked.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("tpu")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --device 'tpu' is not a device safety-guard can use: choose auto, cpu, ...
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", str(name)):
        raise ValueError(
            f"--device {name!r} is not a device safety-guard can use: choose {DEVICES}."
        )
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name} was asked for, but torch sees no CUDA device. Use --device cpu "
                "(or auto)."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                f"numbered from 0. Use --device cuda:0 ... cuda:{torch.cuda.device_count() - 1}."
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            "--device mps was asked for, but torch has no MPS device. Use --device cpu."
        )
    return device


def _looks_like_path(model_id: str) -> bool:
    return (
        model_id.startswith((".", "/", "~"))
        or model_id.count("/") > 1
        or Path(model_id).suffix in (".gguf", ".safetensors", ".bin")
    )


def load_model(
    model_id: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "auto",
    gguf_file: str | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a folder or hub id, on ``device``.

    Args:
        model_id: a local folder, a hub id, or a ``.gguf`` file path.
        dtype: weight dtype (the paper used fp32).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        gguf_file: GGUF file name inside the folder (set automatically for a ``.gguf`` path).

    Raises:
        FileNotFoundError: the local path does not exist or holds no model.
        MissingExtraError: a GGUF file is asked for and the ``gguf`` package is not installed
            (``pip install "safety-guard[gguf]"``).
        OSError: the hub id cannot be resolved (offline, typo, gated).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(str(model_id)).expanduser()
    source = str(model_id)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"No GGUF file at {path}.")
        source, gguf_file = str(path.parent), path.name
    elif path.exists():
        if path.is_dir() and not (path / "config.json").exists() and gguf_file is None:
            raise FileNotFoundError(
                f"{path} holds no config.json: it is not a transformers model folder "
                "(save one with model.save_pretrained(folder))."
            )
    elif _looks_like_path(source):
        raise FileNotFoundError(f"Model path {source!r} does not exist.")
    torch_dtype = resolve_dtype(dtype)
    if gguf_file:
        require("gguf", "gguf", purpose=f"Loading the GGUF file {gguf_file!r}")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra, **kwargs)
    except OSError as err:
        raise OSError(
            f"Could not load {source!r}: {err}\nIf this is a hub id, check the name and your network "
            "(offline machines need a local folder); if it is a local folder, check its path."
        ) from err
    model.to(resolve_device(device))
    model.eval()
    return model, tokenizer
