"""The model being measured: loading it (:mod:`.loading`), the weights a landscape moves and
their names (:mod:`.parameters`), its fingerprint (:mod:`.fingerprint`), PEFT adapters
(:mod:`.adapters`), quantized weights (:mod:`.quantized`) and its wrappers (:mod:`.wrappers`).

Example:
    >>> from safety_guard.models import resolve_dtype
    >>> resolve_dtype("bf16")
    torch.bfloat16
"""

from safety_guard.models.loading import load_model, resolve_device, resolve_dtype

__all__ = ["load_model", "resolve_device", "resolve_dtype"]
