"""Shared helpers of the benchmarks: a tiny offline tokenizer, a ~100M Llama, RSS and tables.

The tokenizer is the one the tests use (``safety_guard.testbed.tiny``) (a 200-token byte-level BPE with a chat
template, trained in memory on the built-in prompts), so nothing is downloaded.

Example:
    >>> from _common import markdown_table  # run from benchmarks/
    >>> print(markdown_table([{"a": 1, "b": "x"}]))
    | a | b |
    |---|---|
    | 1 | x |
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def run_in_subprocess(
    script: str | Path,
    child_args: Sequence[str],
    result_file: Path,
    label: str,
    timeout: float | None = None,
) -> Any | None:
    """Run ``script`` again in a fresh Python process (clean peak RSS) and return its JSON result.

    The child gets ``child_args`` plus ``--result-file result_file`` and must write its result
    there; a failed child (non-zero exit or no file) is reported on stdout and gives ``None``.
    """
    cmd = [
        sys.executable,
        str(Path(script).resolve()),
        *child_args,
        "--result-file",
        str(result_file),
    ]
    proc = subprocess.run(cmd, check=False, timeout=timeout)
    if proc.returncode != 0 or not result_file.exists():
        print(f"[{label}] FAILED (exit {proc.returncode})", flush=True)
        return None
    return json.loads(result_file.read_text(encoding="utf-8"))


def build_tokenizer(vocab_size: int = 200) -> Any:
    """The tests' offline tokenizer (:func:`safety_guard.testbed.tiny.tiny_tokenizer`)."""
    from safety_guard.testbed.tiny import tiny_tokenizer

    return tiny_tokenizer(vocab_size)


def build_llama(
    num_layers: int = 8,
    hidden: int = 768,
    intermediate: int = 2048,
    vocab_size: int = 32000,
    seed: int = 0,
) -> Any:
    """A Llama-shaped causal LM with random weights, float32, eval mode (8 layers ≈ 99.5M params).

    The tokenizer of :func:`build_tokenizer` only produces ids < 200, well below ``vocab_size``;
    eos/pad ids match it (2 and 1).
    """
    from safety_guard.testbed.tiny import tiny_llama

    return tiny_llama(
        vocab_size=vocab_size,
        hidden=hidden,
        num_layers=num_layers,
        intermediate=intermediate,
        heads=12,
        kv_heads=4,
        tie=False,
        seed=seed,
    )


def parameter_stats(model: Any) -> dict[str, int]:
    """Parameter count, bytes, and the bytes of the largest single parameter tensor."""
    params = list(model.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "largest_tensor_bytes": max(p.numel() * p.element_size() for p in params),
    }


def parameters_sha256(model: Any) -> str:
    """sha256 of every parameter's raw bytes, in ``named_parameters`` order (no full copy)."""
    import torch

    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        data = p.detach()
        if data.device.type != "cpu" or not data.is_contiguous():
            data = data.contiguous().cpu()
        digest.update(memoryview(data.view(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def rss_bytes() -> int:
    """Current resident set size (VmRSS) of this process."""
    return _status_kib("VmRSS") * 1024


def max_rss_bytes() -> int:
    """Lifetime peak RSS of this process (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) via ``/proc/self/clear_refs`` (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def window_peak_rss_bytes() -> int:
    """VmHWM: the peak RSS since the last :func:`reset_peak_rss` (or since start)."""
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def machine_info() -> dict[str, str]:
    """CPU count, RAM, CPU model, Python and torch versions."""
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        kib = _meminfo_kib("MemTotal")
        ram = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, RuntimeError):
        pass
    return {
        "nproc": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "ram": ram,
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/meminfo")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (the keys of the first row, unless ``columns``)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_table(
    rows: Sequence[dict[str, Any]],
    output_dir: Path,
    stem: str,
    header: str = "",
    footer: str = "",
) -> str:
    """Write ``rows`` as ``<stem>.csv`` and ``<stem>.md`` in ``output_dir``; return the markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    if rows:
        with (output_dir / f"{stem}.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
    text = "\n\n".join(part for part in (header, table, footer) if part) + "\n"
    (output_dir / f"{stem}.md").write_text(text, encoding="utf-8")
    return text
