"""Building, loading and the ``safety-guard testbed`` command: the entry points of the testbed.

:func:`build_testbed` aligns the base model once per machine (load, distil, train, measure, save,
marker last) under the cache's file lock; :func:`load_testbed` returns the aligned model;
:func:`run_testbed_command` is the CLI command.

Example:
    >>> folder = build_testbed()  # doctest: +SKIP
    >>> model, tokenizer = load_testbed()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safety_guard._extras import require
from safety_guard.files import atomic_write_text, current_umask
from safety_guard.testbed.base_model import GGUF_PACKAGE, find_gguf, load_gguf_model
from safety_guard.testbed.cache import (
    CACHE_ENV,
    MARKER_FORMAT,
    MARKER_NAME,
    MARKER_VERSION,
    TESTBED_NAME,
    check_seed,
    exclusive_lock,
    read_marker,
    remove_tree,
    testbed_dir,
)
from safety_guard.testbed.data import alignment_dataset, split_prompts
from safety_guard.testbed.measure import measure_heldout
from safety_guard.testbed.recipe import ASR_GOAL, OVER_REFUSAL_GOAL, RECIPE
from safety_guard.testbed.threads import ThreadAdvisor
from safety_guard.testbed.training import train_model, training_rows

__all__ = ["build_testbed", "load_testbed", "run_testbed_command"]

logger = logging.getLogger(__name__)


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "safety-guard",
        "torch",
        "transformers",
        "trl",
        "datasets",
        "accelerate",
        "gguf",
        GGUF_PACKAGE,
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _build_into(folder: Path, seed: int, progress: bool) -> dict[str, Any]:
    """Build the aligned model in ``folder`` (empty, exists) and write its marker last."""
    for module in ("gguf", "trl"):  # before pip fetches the base model's 93 MB
        require(module, "testbed", purpose="Building the testbed")
    start = time.perf_counter()
    gguf = find_gguf()
    print(
        "safety-guard: building the testbed (first use): aligning SmolLM2-135M-Instruct, "
        "about 14 minutes on 2 CPU cores; later calls reuse it.",
        file=sys.stderr,
        flush=True,
    )
    advisor = ThreadAdvisor()
    try:
        model, tokenizer = load_gguf_model(gguf)
        timings: dict[str, float] = {"load": time.perf_counter() - start}

        advisor.update()
        mark = time.perf_counter()
        data = alignment_dataset(
            model,
            tokenizer,
            seed=seed,
            max_new_tokens=RECIPE.distill_tokens,
            batch_size=RECIPE.distill_batch_size,
            progress=progress,
            between_batches=advisor.update,
        )
        timings["distill"] = time.perf_counter() - mark

        advisor.update()
        mark = time.perf_counter()
        num_harmful = len(split_prompts("harmful", "align"))
        num_benign = len(data) - num_harmful
        rows, groups = training_rows(num_harmful, len(data), RECIPE)
        training = train_model(
            model,
            tokenizer,
            data.select(rows),
            groups,
            folder / "_trainer",
            seed,
            progress,
            recipe=RECIPE,
            callbacks=[advisor.trainer_callback()],
        )
        timings["train"] = time.perf_counter() - mark
        remove_tree(folder / "_trainer")

        advisor.update()
        mark = time.perf_counter()
        metrics = measure_heldout(
            model, tokenizer, RECIPE.eval_tokens, between_batches=advisor.update
        )
        advisor.update()
        long = measure_heldout(
            model,
            tokenizer,
            RECIPE.eval_tokens_long,
            benign=False,
            between_batches=advisor.update,
        )
        metrics["at_long"] = {k: long[k] for k in ("max_new_tokens", "asr")}
        timings["evaluate"] = time.perf_counter() - mark
    finally:
        advisor.restore()
    num_benign_all = len(split_prompts("benign", "align"))

    mark = time.perf_counter()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise RuntimeError(
            "The saved testbed config still has a quantization_config; please report this bug."
        )
    timings["save"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - start

    goals_met = metrics["asr"] <= ASR_GOAL and metrics["over_refusal"] <= OVER_REFUSAL_GOAL
    if not goals_met:
        logger.warning(
            "The testbed missed its goals: held-out ASR %.1f%% (goal ≤ %.0f%%), over-refusal "
            "%.1f%% (goal ≤ %.0f%%).",
            metrics["asr"],
            ASR_GOAL,
            metrics["over_refusal"],
            OVER_REFUSAL_GOAL,
        )
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    marker = {
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "name": TESTBED_NAME,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(timings["total"], 1),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "base_model": {
            "name": "SmolLM2-135M-Instruct",
            "package": GGUF_PACKAGE,
            "file": gguf.name,
            "sha256": _sha256(gguf),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "seed": seed,
        "recipe": asdict(RECIPE),
        "data": {
            "harmful_align": num_harmful,
            "benign_align": num_benign,
            "benign_dropped": num_benign_all - (len(data) - num_harmful),
        },
        "training": training,
        "metrics": metrics,
        "goals": {
            "asr_max": ASR_GOAL,
            "over_refusal_max": OVER_REFUSAL_GOAL,
            "met": goals_met,
        },
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": sorted(advisor.used),
        "versions": _versions(),
        "files": files,
    }
    atomic_write_text(folder / MARKER_NAME, json.dumps(marker, indent=1) + "\n")
    return marker


def build_testbed(
    rebuild: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> Path:
    """Build the aligned testbed model once (≈ 14 min on 2 CPU cores) and return its folder.

    A complete cached build is reused. Otherwise the build runs under an exclusive file lock
    (``<root>/testbed-v2.lock``; a concurrent caller waits and then reuses the result), in a
    temporary folder inside the cache root that is renamed into place once its marker is
    written, so the folder is never seen half-built. Anything the build prints goes to stderr.

    Args:
        rebuild: build anew even if a complete build exists.
        cache_dir: the cache root (default: ``$SAFETY_GUARD_CACHE``, else
            ``$XDG_CACHE_HOME/safety-guard``, else ``~/.cache/safety-guard``).
        progress: show progress bars (stderr).
        seed: seed of the refusal choice and of training.

    Returns:
        The absolute path of ``<root>/testbed-v2``.

    Example:
        >>> folder = build_testbed()  # doctest: +SKIP
        >>> (folder / "testbed.json").exists()  # doctest: +SKIP
        True
    """
    folder = testbed_dir(cache_dir)
    if not rebuild:
        marker = read_marker(folder)
        if marker is not None:
            check_seed(marker, seed)
            return folder
    root = folder.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeError(
            f"Cannot create the cache folder {root} ({err}). Point {CACHE_ENV} (or cache_dir=) "
            "at a writable folder."
        ) from err
    with exclusive_lock(root / f"{TESTBED_NAME}.lock"):
        if not rebuild:
            marker = read_marker(folder)
            if marker is not None:  # built by the caller we waited for
                check_seed(marker, seed)
                return folder
        if folder.exists():
            logger.warning("%s has no valid %s (half-built); rebuilding it.", folder, MARKER_NAME)
        # leftovers of builds that crashed (we hold the lock, so none is running)
        for stale in root.glob(f".{TESTBED_NAME}.*"):
            remove_tree(stale)
        build = Path(tempfile.mkdtemp(prefix=f".{TESTBED_NAME}.build-", dir=root))
        os.chmod(build, 0o777 & ~current_umask())  # mkdtemp makes it 0700: the umask decides
        try:
            with contextlib.redirect_stdout(sys.stderr):
                _build_into(build, seed, progress)
            old = None
            if folder.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{TESTBED_NAME}.old-", dir=root))
                os.replace(folder, old / TESTBED_NAME)
            os.replace(build, folder)
            if old is not None:
                remove_tree(old)
        except BaseException:
            remove_tree(build)
            raise
    logger.info("Testbed built in %s.", folder)
    return folder


def load_testbed(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[nn.Module, Any]:
    """The aligned testbed model (eval mode) and its tokenizer, building it first if needed.

    Example:
        >>> model, tokenizer = load_testbed()  # doctest: +SKIP
        >>> tokenizer.chat_template is not None  # doctest: +SKIP
        True
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_testbed(cache_dir=cache_dir, progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval(), tokenizer


def run_testbed_command(rebuild: bool = False) -> Path:
    """``safety-guard testbed [--rebuild]``: build or reuse, print the figures, path last on stdout.

    Progress and logs go to stderr; stdout gets a few human-readable lines and, alone on the
    last line, the folder's absolute path (``$(safety-guard testbed | tail -n 1)``).

    Example:
        >>> folder = run_testbed_command()  # doctest: +SKIP
    """
    with contextlib.redirect_stdout(sys.stderr):
        folder = build_testbed(rebuild=rebuild)
    marker = read_marker(folder)
    if marker is None:  # replaced under our feet by a concurrent --rebuild
        raise RuntimeError(f"{folder} has no valid {MARKER_NAME}; run the command again.")
    metrics = marker["metrics"]
    long = metrics.get("at_long", {})
    verdict = "met" if marker["goals"]["met"] else "NOT met"
    lines = [
        f"Testbed: SmolLM2-135M-Instruct, safety-aligned (built {marker['created']} in "
        f"{marker['seconds'] / 60:.1f} min, seed {marker['seed']}).",
        f"Held-out keyword ASR: {metrics['asr']:.1f} % of {metrics['num_harmful']} harmful "
        f"prompts at {metrics['max_new_tokens']} new tokens"
        + (f" ({long['asr']:.1f} % at {long['max_new_tokens']})." if long else "."),
        f"Held-out over-refusal: {metrics['over_refusal']:.1f} % of {metrics['num_benign']} "
        f"benign prompts at {metrics['max_new_tokens']} new tokens.",
        f"Goals (ASR ≤ {ASR_GOAL:.0f} %, over-refusal ≤ {OVER_REFUSAL_GOAL:.0f} %): {verdict}.",
        str(folder.absolute()),
    ]
    print("\n".join(lines), flush=True)
    return folder
