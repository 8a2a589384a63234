"""How to recognise a model again: its fingerprint, from memory or a checkpoint folder.

Example:
    >>> compare_fingerprints(model_fingerprint(model), checkpoint_fingerprint("folder"))  # doctest: +SKIP
    []
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safety_guard.engines.collectives import all_reduce_sum, rank_and_world
from safety_guard.engines.shards import (
    is_sharded,
    local_shard,
    reshard,
)
from safety_guard.models.parameters import check_engine, named_canonical_parameters
from safety_guard.models.quantized import dense_shape, dense_weight, is_quantized
from safety_guard.models.wrappers import unwrap_model

__all__ = [
    "FINGERPRINT_VERSION",
    "PROJECTION_TOL",
    "QUANTIZED_PROJECTION_TOL",
    "checkpoint_fingerprint",
    "compare_fingerprints",
    "model_fingerprint",
]

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

#: The fingerprint format (its ``"version"`` key). Version 1 (no key): the norms and 16 sampled
#: values of 4 tensors. Version 2: every floating-point tensor's shape, norm and projection, and
#: the version-1 samples of the same 4 tensors (so that version-1 files still compare).
FINGERPRINT_VERSION = 2

#: A tensor's projections match within this fraction of its norm (see :func:`model_fingerprint`).
PROJECTION_TOL = 1e-2
#: The same when either model is bitsandbytes-quantized (dequantized 4-bit weights are 9–19 % of
#: the norm away from the full-precision ones).
QUANTIZED_PROJECTION_TOL = 1.5

#: Elements per block of the projection's sign table: block by block of a tensor's flattening,
#: its signs are the table rotated by an offset hashed from the tensor's name and the block index.
_BLOCK = 1 << 20
_MASK32 = 0xFFFFFFFF
_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _mix32(x: int) -> int:
    """A 32-bit integer hash (Wellons' *lowbias32*), on Python integers."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(x · factor) mod 2³² for int64 ``x`` < 2³², in 16-bit halves: no int64 overflow."""
    low, high = factor & 0xFFFF, factor >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _sign_table(device: torch.device) -> torch.Tensor:
    """The ±1 sign table on ``device`` (float64, twice over: any rotation is one slice): the
    top bit of :func:`_mix32` of each index. Integer arithmetic, so the same table on every
    device and torch version (a torch random generator may change between versions).

    Example:
        >>> table = _sign_table(torch.device("cpu"))
        >>> [int(v) for v in table[:6]] == [1 - 2 * (_mix32(i) >> 31) for i in range(6)]
        True
    """
    table = _SIGN_TABLES.get(device)
    if table is None:
        x = torch.arange(_BLOCK, dtype=torch.int64)
        x = x ^ (x >> 16)
        x = _mul32(x, 0x7FEB352D)
        x = x ^ (x >> 15)
        x = _mul32(x, 0x846CA68B)
        x = x ^ (x >> 16)
        signs = 1.0 - 2.0 * (x >> 31).to(torch.float64)
        table = _SIGN_TABLES[device] = torch.cat([signs, signs]).to(device)
    return table


def _name_seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _block_offset(seed: int, block: int) -> int:
    """Where block ``block`` of the tensor with seed ``seed`` starts in the sign table."""
    return _mix32(seed ^ _mix32(block + 0x9E3779B9)) % _BLOCK


@torch.no_grad()
def _tensor_stats(
    pieces: Iterable[tuple[int, torch.Tensor]], seed: int, samples: torch.Tensor | None
) -> list[float]:
    """``[Σ x², Σ vᵢ·bf16(xᵢ), *values at the flat indices samples]`` over ``pieces`` of one
    tensor: (flat offset in the whole tensor, 1-D part of it). A sample no piece holds reads 0,
    so partial results of a tensor's shards add up to the whole tensor's. Float64, in chunks of
    at most :data:`_BLOCK` elements (the sign of element i depends on i only).

    Example:
        >>> w = torch.randn(3000)
        >>> whole = _tensor_stats([(0, w)], 7, torch.tensor([0, 2999]))
        >>> parts = [_tensor_stats([(a, w[a:b])], 7, torch.tensor([0, 2999]))
        ...          for a, b in [(0, 1000), (1000, 3000)]]
        >>> all(math.isclose(x, y + z, rel_tol=1e-9, abs_tol=1e-9)
        ...     for x, y, z in zip(whole, *parts))
        True
    """
    sumsq, proj = 0.0, 0.0
    values = torch.zeros(0 if samples is None else len(samples), dtype=torch.float64)
    for offset, flat in pieces:
        table = _sign_table(flat.device)
        acc = torch.zeros(2, dtype=torch.float64, device=flat.device)
        start = 0
        while start < flat.numel():
            block, pos = divmod(offset + start, _BLOCK)
            size = min(_BLOCK - pos, flat.numel() - start)
            chunk = flat[start : start + size]
            exact = chunk.double()
            rounded = exact if chunk.dtype == torch.bfloat16 else chunk.to(torch.bfloat16).double()
            at = _block_offset(seed, block) + pos
            acc[0] += torch.dot(exact, exact)
            acc[1] += torch.dot(rounded, table[at : at + size])
            start += size
        part_sumsq, part_proj = acc.tolist()
        sumsq, proj = sumsq + part_sumsq, proj + part_proj
        if samples is not None:
            held = (samples >= offset) & (samples < offset + flat.numel())
            if bool(held.any()):
                local = (samples[held] - offset).to(flat.device)
                values[held] = flat[local].double().cpu()
    return [sumsq, proj, *values.tolist()]


def _sample_index(numel: int) -> torch.Tensor:
    # float64: float32 positions round past the end for tensors over 2**24 elements
    idx = torch.linspace(0, numel - 1, steps=min(_N_SAMPLES, numel), dtype=torch.float64)
    return idx.round().long().clamp_(0, numel - 1)


def _sample_picks(count: int, num_tensors: int) -> set[int]:
    """The indices of the tensors whose values are sampled (version 1's choice)."""
    if not count:
        return set()
    return {round(i * (count - 1) / max(num_tensors - 1, 1)) for i in range(num_tensors)}


def _architecture(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    cfg = config.to_dict()
    return {k: cfg.get(k) for k in _ARCH_KEYS if k in cfg}


def _fingerprint(
    arch: dict[str, Any],
    shapes: Sequence[tuple[str, Sequence[int]]],
    stats: Sequence[Sequence[float]],
    quantized: bool,
) -> dict[str, Any]:
    """The fingerprint from each tensor's (name, shape) and :func:`_tensor_stats` (summed over
    ranks; samples only for the picked tensors)."""
    tensors = []
    for (name, shape), values in zip(shapes, stats, strict=True):
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(shape),
            "norm": math.sqrt(max(values[0], 0.0)),
            "projection": values[1],
        }
        if len(values) > 2:  # float32, as version 1 wrote them
            entry["samples"] = [float(torch.tensor(v).float()) for v in values[2:]]
        tensors.append(entry)
    out: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "architecture": arch,
        "num_parameters": int(sum(math.prod(shape) for _, shape in shapes)),
        "tensors": tensors,
    }
    if quantized:
        out["quantized"] = True
    return out


def model_fingerprint(model: nn.Module, num_tensors: int = 4) -> dict[str, Any]:
    """A dtype-independent fingerprint of the model's weights: its architecture config, its
    parameter count and, for every floating-point weight tensor (canonical names, see
    :func:`named_canonical_parameters`: PEFT adapter factors are not part of it), its shape, L2
    norm and a *projection* ``Σᵢ vᵢ·bf16(wᵢ)``, with signs ``vᵢ = ±1`` hashed from the tensor's
    name and the element's flat index (the same on every device, in every shard layout). Of
    ``num_tensors`` tensors spread over the model, 16 sampled values are kept too, as the
    version-1 fingerprint does, so that files holding a version-1 fingerprint still compare
    (:func:`compare_fingerprints`). Format version :data:`FINGERPRINT_VERSION`.

    One pass over the weights, in float64 chunks of 2²⁰ elements: no copy of the model, no
    tensor-sized temporary. FSDP2, FSDP (1) and ZeRO-3 shards give partial sums over each rank's
    shard (the signs indexed by the shard's offset in the whole tensor), summed over ranks in one
    all-reduce; bitsandbytes-quantized weights are dequantized one tensor at a time, and the
    fingerprint says ``"quantized": true``. Other engines are refused (:func:`check_engine`).

    Why a projection, and its tolerance: for independent random signs, ``v·d`` has mean 0 and
    standard deviation ``‖d‖`` for any change ``d`` of the weights, so a change of a fraction ε
    of a tensor's norm moves its projection by about ε·‖w‖ (Gaussian-like), wherever it lies,
    while a change uncorrelated with the weights moves their norm by only ~ε²/2 (0.1 % for
    ε = 0.05: within the norms' tolerance). Projections match within :data:`PROJECTION_TOL` =
    0.01·‖w‖ (measured: fp16 against fp32 copies differ by 0.001·‖w‖ on average):

    * the same weights in fp32 or bf16 project alike: the values are rounded to bf16 first (the
      rounding fp32 → bf16 makes), so only float64 summation order differs (~1e-15);
    * an fp16 copy differs from bf16 rounding in the ~1/16 of the elements where fp16 rounding
      crosses (or ties on) a bf16 rounding boundary, by one bf16 step (2⁻⁸ to 2⁻⁷ of the
      value): ‖d‖ ≈ ¼·2⁻⁷·⁵·‖w‖ ≈ 0.0014·‖w‖, the tolerance is 7 standard deviations
      (Hoeffding: P < 2·exp(−0.01²/(2·0.0014²)) ≈ 1e-11 per tensor). Without the bf16 rounding,
      bf16 against fp32 would give ‖d‖ ≈ 2⁻⁸/√3·‖w‖ ≈ 0.0023·‖w‖: 4 standard deviations, false
      alarms among hundreds of tensors;
    * a change of ε = 0.01 of a tensor's norm is flagged in that tensor with probability 0.32,
      ε = 0.03 with 0.74, ε = 0.1 with 0.92; a LoRA on q_proj and v_proj changes two tensors per
      layer, so a 32-layer model merged with ε = 0.01 is missed with probability 0.68⁶⁴ ≈ 2e-11.

    With quantized weights the projections match within :data:`QUANTIZED_PROJECTION_TOL` =
    1.5·‖w‖: dequantized 4-bit weights are 9–13 % of the norm away from the full-precision ones
    (NF4, FP4 in blocks of 64 on Gaussian weights; up to 19 % for FP4 on heavy-tailed ones;
    8-bit: 0.3–2 %), and at 19 % the tolerance is 7.9 standard deviations (P ≈ 3e-15 per
    tensor). That still tells independently trained weights apart (ε ≈ √2: flagged with
    probability 0.29 in each tensor), not a finetune of the same base.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
        >>> fp = model_fingerprint(model)
        >>> fp["version"], len(fp["tensors"]), sorted(fp["tensors"][1])
        (2, 12, ['name', 'norm', 'projection', 'shape'])
        >>> compare_fingerprints(fp, model_fingerprint(model.to(torch.bfloat16)))  # same weights
        []
        >>> w = model.model.layers[0].self_attn.q_proj.weight  # a rank-1 change of 10 % of ‖w‖:
        >>> u, v = torch.randn(16, 1), torch.randn(1, 16)  # its norm moves by 0.5 % only
        >>> with torch.no_grad():
        ...     _ = w.add_((0.1 * w.norm() / (u.norm() * v.norm()) * u @ v).to(w.dtype))
        >>> compare_fingerprints(fp, model_fingerprint(model))  # doctest: +ELLIPSIS
        ['tensor model.layers.0.self_attn.q_proj.weight: weights differ ...']
    """
    reshard(model)
    check_engine(model, allow_sharded=True, allow_quantized=True)
    params = [
        (n, p)
        for n, p in named_canonical_parameters(model)
        if p.is_floating_point() or is_quantized(p)
    ]
    picks = _sample_picks(len(params), num_tensors)
    sharded = is_sharded(p for _, p in params)  # partial sums over the shards, all-reduced
    rank = rank_and_world()[0]
    shapes, local = [], []
    for i, (name, param) in enumerate(params):
        if is_quantized(param):  # dequantized whole, one tensor at a time
            shape, offset, whole = dense_shape(param), 0, True
            flat = dense_weight(param).reshape(-1)
        else:
            shard = local_shard(param)
            shape, offset, flat = shard.shape, shard.offset, shard.tensor.reshape(-1)
            whole = not shard.sharded
        samples = _sample_index(shape.numel()) if i in picks else None
        # a tensor every rank holds whole counts once in the sum over ranks
        pieces = [] if sharded and whole and rank != 0 else [(offset, flat)]
        local.append(_tensor_stats(pieces, _name_seed(name), samples))
        shapes.append((name, tuple(shape)))
        del flat
    stats = local
    if sharded:
        reduced = iter(all_reduce_sum([v for values in local for v in values]))
        stats = [[next(reduced) for _ in values] for values in local]
    quantized = any(is_quantized(p) for _, p in params)
    arch = _architecture(getattr(unwrap_model(model), "config", None))
    return _fingerprint(arch, shapes, stats, quantized)


def _checkpoint_files(folder: Path) -> dict[str, str]:
    """Tensor name → safetensors file (relative to ``folder``) of a checkpoint folder, in the
    order of its index (or of its file)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(
            f"No safetensors checkpoint in {folder}: neither model.safetensors nor "
            "model.safetensors.index.json. Save the model with save_pretrained(FOLDER) "
            "(safe_serialization, the default)."
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt", device="cpu") as handle:
        return dict.fromkeys(handle.keys(), "model.safetensors")


def _loaded_parameter_names(config: Any) -> list[str] | None:
    """The canonical floating-point parameter names, in model order, of the model
    ``from_pretrained`` builds from ``config`` (built on the meta device: no memory), or None
    when transformers has no class of ``config.architectures`` (remote code)."""
    import transformers

    classes = [getattr(transformers, a, None) for a in getattr(config, "architectures", None) or ()]
    cls = next((c for c in classes if isinstance(c, type) and issubclass(c, nn.Module)), None)
    if cls is None:
        return None
    with torch.device("meta"):
        model = cls(config)
    return [n for n, p in named_canonical_parameters(model) if p.is_floating_point()]


def _file_pieces(part: Any) -> Iterator[tuple[int, torch.Tensor]]:
    """A safetensors tensor (``safe_open(...).get_slice(name)``) read in slices of whole rows
    of about :data:`_BLOCK` elements: (flat offset, 1-D slice)."""
    shape = part.get_shape()
    if not shape:
        yield 0, part[...].reshape(-1)
        return
    row = math.prod(shape[1:])
    rows = max(1, _BLOCK // max(row, 1))
    for start in range(0, shape[0], rows):
        yield start * row, part[start : start + rows].reshape(-1)


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def checkpoint_fingerprint(folder: str | os.PathLike[str], num_tensors: int = 4) -> dict[str, Any]:
    """The :func:`model_fingerprint` of the model ``from_pretrained(folder)`` loads, read from
    the safetensors checkpoint in ``folder`` (``model.safetensors``, or sharded with
    ``model.safetensors.index.json``) tensor by tensor, in slices of about 2²⁰ elements: the
    weights a resumed full finetune started from, without loading the model.

    The architecture comes from the folder's ``config.json``, the tensor names and their order
    from the model class it names, built on the meta device (a tied output embedding is the input
    embedding, once, as in the loaded model; a file tensor the model does not have is not read).
    Without such a class in transformers (remote code), the file's floating-point tensors are
    read, ``lm_head.weight`` left out when ``tie_word_embeddings``. Raises ``FileNotFoundError``
    when ``folder`` holds no safetensors checkpoint.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
        >>> with tempfile.TemporaryDirectory() as folder:  # what save_pretrained(folder) writes
        ...     model.config.save_pretrained(folder)
        ...     save_file(model.state_dict(), f"{folder}/model.safetensors")
        ...     compare_fingerprints(model_fingerprint(model), checkpoint_fingerprint(folder))
        []
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    folder = Path(folder)
    files = _checkpoint_files(folder)
    config = AutoConfig.from_pretrained(folder)
    names = _loaded_parameter_names(config)
    if names is None:
        names = list(files)
        if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in files:
            names.remove("lm_head.weight")
    picks = _sample_picks(len(names), num_tensors)
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}
        shapes, stats = [], []
        for i, name in enumerate(names):
            file = files.get(name)
            if file is None:
                continue  # compare_fingerprints says it is missing
            if file not in handles:
                handles[file] = stack.enter_context(
                    safe_open(str(folder / file), framework="pt", device="cpu")
                )
            part = handles[file].get_slice(name)
            if part.get_dtype() not in _FLOAT_DTYPES and not part.get_dtype().startswith("F8"):
                continue
            shape = tuple(part.get_shape())
            samples = _sample_index(math.prod(shape)) if i in picks else None
            stats.append(_tensor_stats(_file_pieces(part), _name_seed(name), samples))
            shapes.append((name, shape))
    return _fingerprint(_architecture(config), shapes, stats, False)


def compare_fingerprints(
    expected: dict[str, Any],
    actual: dict[str, Any],
    rtol: float = 2e-2,
    atol: float = 1e-3,
    *,
    what: str = "model",
) -> list[str]:
    """Differences between two fingerprints, as human-readable lines (empty when they match):
    ``expected`` (a landscape file's) against ``actual`` (the ``what``'s: ``"model"``,
    ``"checkpoint"``).

    Architecture and parameter count must be equal; each tensor of ``expected`` must be in
    ``actual`` with the same shape, norms within ``rtol`` (and ``atol``), projections within
    :data:`PROJECTION_TOL` of the norm (see :func:`model_fingerprint`), sampled values within
    ``rtol``. Fingerprints of version 1 (no ``"version"``: 4 tensors, their norms and samples)
    are compared on what both have. When either model is quantized (QLoRA's base), values match
    only up to the quantization error: norms are compared within 5 %, projections within
    :data:`QUANTIZED_PROJECTION_TOL` of the norm, and sampled values not at all.

    Example:
        >>> old = {"architecture": {}, "num_parameters": 4,
        ...        "tensors": [{"name": "w", "shape": [4], "norm": 2.0, "samples": [1.0] * 4}]}
        >>> new = {"version": 2, "architecture": {}, "num_parameters": 4,
        ...        "tensors": [{"name": "w", "shape": [4], "norm": 2.0, "projection": 0.0,
        ...                     "samples": [1.0, 1.0, 1.0, -1.0]}]}
        >>> compare_fingerprints(old, new)
        ['tensor w: sampled values differ (1 vs -1)']
    """
    problems = []
    quantized = bool(expected.get("quantized") or actual.get("quantized"))
    ptol = QUANTIZED_PROJECTION_TOL if quantized else PROJECTION_TOL
    if quantized:
        rtol = max(rtol, 5e-2)
    for key in sorted(set(expected.get("architecture", {})) | set(actual.get("architecture", {}))):
        a, b = expected.get("architecture", {}).get(key), actual.get("architecture", {}).get(key)
        if a != b:
            problems.append(f"config {key}: file has {a!r}, {what} has {b!r}")
    if expected.get("num_parameters") != actual.get("num_parameters"):
        problems.append(
            f"parameter count: file has {expected.get('num_parameters')}, "
            f"{what} has {actual.get('num_parameters')}"
        )
    actual_tensors = {t["name"]: t for t in actual.get("tensors", [])}
    complete = actual.get("version", 1) >= 2  # (version 1 lists 4 tensors)
    for t in expected.get("tensors", []):
        other = actual_tensors.get(t["name"])
        if other is None:
            if complete:
                problems.append(f"tensor {t['name']}: missing from the {what}")
            continue
        if other["shape"] != t["shape"]:
            problems.append(f"tensor {t['name']}: shape {t['shape']} vs {other['shape']}")
            continue
        if not math.isclose(t["norm"], other["norm"], rel_tol=rtol, abs_tol=atol):
            problems.append(f"tensor {t['name']}: norm {t['norm']:.6g} vs {other['norm']:.6g}")
            continue
        if "projection" in t and "projection" in other:
            a, b = t["projection"], other["projection"]
            bound = ptol * max(t["norm"], other["norm"]) + 1e-12
            if not abs(a - b) <= bound:  # (NaN differs)
                problems.append(
                    f"tensor {t['name']}: weights differ (projection {a:.6g} vs {b:.6g}, "
                    f"{abs(a - b) / (bound / ptol):.2g} of its norm; the tolerance is {ptol:g})"
                )
                continue
        if quantized:
            continue
        samples, other_samples = t.get("samples") or [], other.get("samples") or []
        scale = max((abs(v) for v in samples), default=1.0)
        for a, b in zip(samples, other_samples, strict=False):
            if abs(a - b) > atol * scale + rtol * abs(a) + 1e-8:
                problems.append(f"tensor {t['name']}: sampled values differ ({a:.6g} vs {b:.6g})")
                break
    if expected.get("version", 1) >= 2 and actual.get("version", 1) >= 2:
        names = {t["name"] for t in expected.get("tensors", [])}
        problems += [
            f"tensor {t['name']}: in the {what}, not in the file"
            for t in actual.get("tensors", [])
            if t["name"] not in names
        ]
    return problems
