"""Training the testbed: TRL's ``SFTTrainer`` on the alignment data, with the loss the recipe asks.

* :func:`training_rows` / :func:`_training_order` — which rows a pass sees, and in what order;
* :func:`_model_loss_sft_trainer` — the ``SFTTrainer`` subclass whose loss comes from the model's
  own logits (faster on CPU), optionally weighing each answer's opening tokens;
* :func:`train_model` — one supervised finetune by the recipe.

Example:
    >>> training_rows(2, 3, TestbedRecipe(harmful_repeats=2, benign_repeats=1))
    ([0, 1, 0, 1, 2], [0, 0, 0, 0, 1])
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from safety_guard._extras import require
from safety_guard.testbed.data import prompt_completion
from safety_guard.testbed.recipe import RECIPE, TestbedRecipe

if TYPE_CHECKING:
    import datasets

__all__: list[str] = []  # private helpers of the build; see safety_guard.testbed.build


def _training_order(
    lengths: Sequence[int], groups: Sequence[int], micro_batch: int, epochs: int, seed: int
) -> list[int]:
    """Row order for ``epochs`` passes of paired micro-batches: harmful, benign, harmful, ...

    Group 0 (harmful → refusal) sets the pace: each pass takes all its rows once, shuffled,
    and pairs every micro-batch of them with a micro-batch of group 1 (benign → own answer),
    whose rows are cycled in shuffled order to keep up. With gradient accumulation over 2
    micro-batches, every optimizer step sees as many refusals as answers, and since TRL divides
    the summed token loss by the step's token count, a step equals one mixed batch of
    ``2 * micro_batch`` rows, without padding short refusals to the length of long answers.
    Rows are sorted by length within windows of 4 micro-batches to pad little.

    Example:
        >>> _training_order([5, 6, 30, 31], [0, 0, 1, 1], micro_batch=1, epochs=1, seed=0)
        [0, 2, 1, 3]
    """
    if len(lengths) != len(groups):
        raise ValueError("lengths and groups must have one entry per row.")
    harmful = [i for i, g in enumerate(groups) if g == 0]
    benign = [i for i, g in enumerate(groups) if g == 1]
    if not harmful or not benign:
        raise ValueError("The alignment data needs both harmful (0) and benign (1) rows.")
    rng = random.Random(seed)
    window = 4 * micro_batch

    def batches(rows: list[int]) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(rows), window):
            chunk = sorted(rows[start : start + window], key=lambda i: lengths[i])
            out += [chunk[k : k + micro_batch] for k in range(0, len(chunk), micro_batch)]
        return out

    order: list[int] = []
    pool: list[int] = []
    for _ in range(epochs):
        rows = harmful[:]
        rng.shuffle(rows)
        pairs = -(-len(rows) // micro_batch)
        rows += rng.sample(harmful, pairs * micro_batch - len(rows))  # fill the last batch
        needed: list[int] = []
        while len(needed) < pairs * micro_batch:
            if not pool:
                pool = benign[:]
                rng.shuffle(pool)
            needed.append(pool.pop())
        for refusals, answers in zip(batches(rows), batches(needed), strict=True):
            order += refusals + answers
    return order


def mixed_precision() -> str:
    """``"bf16"`` on a CPU with native bf16 (AVX512-BF16/AMX: ~1.5-2x faster steps), else ``"no"``.

    On CPUs without it (AVX2 only) bf16 autocast is emulated and several times slower than fp32.

    Example:
        >>> mixed_precision() in ("bf16", "no")
        True
    """
    if torch.cuda.is_available():
        return "no"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    except (AttributeError, RuntimeError):
        return "no"


def _weighs_openings(opening_tokens: int, opening_weight: float) -> bool:
    """Whether the loss weighs the answers' opening tokens apart (else: a plain token mean)."""
    return opening_weight != 1.0 and opening_tokens > 0


def _model_loss_sft_trainer(opening_tokens: int = 0, opening_weight: float = 1.0) -> type:
    """TRL's ``SFTTrainer`` with the loss computed from the model's own logits (for CPU builds).

    TRL computes the SFT loss with a fused LM head that never materializes the logits. Without
    Triton (on CPU) it projects every position in Python-level tiles and projects them again in
    the backward pass: measured on the testbed's 2-core build, a step (batch 8) took 6.0 s that
    way and 4.1 s with the model's own forward (logits + cross-entropy over the same completion
    tokens, same loss to 1e-4). The only thing lost is TRL's entropy/token-accuracy logging.

    With ``opening_weight != 1`` the loss is a weighted token mean in which the first
    ``opening_tokens`` answer tokens of each row weigh ``opening_weight``: that is where a
    reply refuses or complies, while the rest of a refusal is nearly determined by its start.

    Example:
        >>> _model_loss_sft_trainer().__name__
        'ModelLossSFTTrainer'
    """
    from transformers import Trainer

    require("trl", "testbed", purpose="Training the testbed")
    from trl import SFTTrainer

    if opening_weight <= 0 or opening_tokens < 0:
        raise ValueError(
            "TestbedRecipe.opening_weight must be > 0 and opening_tokens >= 0, got "
            f"{opening_weight} and {opening_tokens}."
        )
    weighted = _weighs_openings(opening_tokens, opening_weight)

    class ModelLossSFTTrainer(SFTTrainer):
        def compute_loss(
            self,
            model: nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if not weighted:
                return Trainer.compute_loss(
                    self,
                    model,
                    inputs,
                    return_outputs=return_outputs,
                    num_items_in_batch=num_items_in_batch,
                )
            # position t predicts token t+1: shift the labels, not the (large) logits
            labels = nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            logits = outputs.logits
            answer = labels != -100
            rank = answer.cumsum(dim=1)  # 1 at each row's first answer token
            weight = torch.where(rank <= opening_tokens, opening_weight, 1.0) * answer
            token_loss = nn.functional.cross_entropy(  # (rows·positions, vocab): contiguous
                logits.reshape(-1, logits.shape[-1]).float(),
                labels.clamp_min(0).reshape(-1),
                reduction="none",
            ).view_as(weight)
            loss = (token_loss * weight).sum() / weight.sum().clamp_min(1.0)
            return (loss, outputs) if return_outputs else loss

    return ModelLossSFTTrainer


def training_rows(
    num_harmful: int, num_rows: int, recipe: TestbedRecipe = RECIPE
) -> tuple[list[int], list[int]]:
    """Rows of the alignment data that one training pass sees, and their groups (0 harmful, 1 benign).

    The data holds the ``num_harmful`` refusals first, then the benign answers; each appears
    ``recipe.harmful_repeats`` or ``recipe.benign_repeats`` times.

    Example:
        >>> training_rows(2, 3, TestbedRecipe(harmful_repeats=2, benign_repeats=1))
        ([0, 1, 0, 1, 2], [0, 0, 0, 0, 1])
    """
    if recipe.harmful_repeats < 1 or recipe.benign_repeats < 1:
        raise ValueError(
            "TestbedRecipe.harmful_repeats and benign_repeats must be at least 1, got "
            f"{recipe.harmful_repeats} and {recipe.benign_repeats}."
        )
    harmful = list(range(num_harmful)) * recipe.harmful_repeats
    benign = list(range(num_harmful, num_rows)) * recipe.benign_repeats
    return harmful + benign, [0] * len(harmful) + [1] * len(benign)


def train_model(
    model: nn.Module,
    tokenizer: Any,
    data: datasets.Dataset,
    groups: Sequence[int],
    output_dir: Path,
    seed: int,
    progress: bool,
    recipe: TestbedRecipe = RECIPE,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """SFT on the assistant answers (TRL, conversational prompt-completion pairs)."""
    require("trl", "testbed", purpose="Training the testbed")
    from trl import SFTConfig, SFTTrainer

    precision = mixed_precision() if recipe.precision == "auto" else recipe.precision
    lengths = [
        len(tokenizer.apply_chat_template(row, tokenize=True, return_dict=True)["input_ids"])
        for row in data["messages"]
    ]
    if recipe.order == "balanced":
        order = _training_order(lengths, groups, recipe.batch_size // 2, recipe.epochs, seed)
        train_data, passes, micro, accumulation = data.select(order), 1, recipe.batch_size // 2, 2
        sampling = "sequential"
    elif recipe.order == "random":
        train_data, passes, micro, accumulation = data, recipe.epochs, recipe.batch_size, 1
        sampling = "random"
    else:
        raise ValueError(
            f"TestbedRecipe.order must be 'random' or 'balanced', got {recipe.order!r}."
        )
    if recipe.loss not in ("completion_only", "full"):
        raise ValueError(
            f"TestbedRecipe.loss must be 'completion_only' or 'full', got {recipe.loss!r}."
        )
    # TRL turns activation checkpointing on by default; off, a CPU step took 2.6 s, not 3.0. The
    # argument was renamed in transformers 5 (the old name still works there, with a warning).
    checkpointing_arg = (
        "activation_checkpointing"
        if "activation_checkpointing" in SFTConfig.__dataclass_fields__
        else "gradient_checkpointing"
    )
    checkpointing = {checkpointing_arg: False}
    config = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=passes,
        learning_rate=recipe.learning_rate,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        # Fused AdamW: one kernel per tensor instead of a dozen elementwise passes; on 2 CPU
        # cores an update of the 106M trainable parameters took 0.06 s against 0.24 s.
        optim="adamw_torch_fused",
        max_length=recipe.max_length,
        completion_only_loss=recipe.loss == "completion_only",
        assistant_only_loss=False,
        packing=False,
        train_sampling_strategy=sampling,
        bf16=precision == "bf16",
        fp16=False,
        **checkpointing,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        seed=seed,
        data_seed=seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    frozen = [model.get_input_embeddings().weight] if recipe.freeze_embeddings else []
    frozen += [
        p for layer in model.model.layers[: recipe.frozen_layers] for p in layer.parameters()
    ]
    for param in frozen:
        param.requires_grad_(False)
    trainer_class = (
        SFTTrainer
        if torch.cuda.is_available()
        and not _weighs_openings(recipe.opening_tokens, recipe.opening_weight)
        else _model_loss_sft_trainer(recipe.opening_tokens, recipe.opening_weight)
    )
    trainer = trainer_class(
        model=model,
        args=config,
        train_dataset=(
            prompt_completion(train_data) if recipe.loss == "completion_only" else train_data
        ),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    try:
        result = trainer.train()
    finally:
        for param in frozen:
            param.requires_grad_(True)
    model.config.use_cache = True
    return {
        "train_loss": float(result.training_loss),
        "steps": int(result.global_step),
        "examples": len(data),
        "passes": recipe.epochs,
        "mixed_precision": precision,
    }
