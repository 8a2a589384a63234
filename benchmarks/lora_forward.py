"""What a LoRA adapter adds to the guard's forward-only probe, and whether merging it would help.

The guard scores θ₀ + s·δ of a LoRA finetune through the adapters, their scaling multiplied by s
(``LoraTracker.along``). This times the same teacher-forced batches (64 built-in probe prompts
in the testbed's chat template, each followed by a 6-token refusal opening, 16 per batch, logits
kept for the opening only) three ways on the testbed with an r-8 adapter on every linear layer:

* **adapter ×2**: what the guard does (PEFT's LoRA path on every linear layer);
* **merged ×2**: each LoRA layer's forward replaced, inside the block, by one matmul with
  ``W + 2·scale·B·A`` built on the fly (one weight's worth of temporary at a time: the
  alternative a merged-weight lookahead would take);
* **no adapter**: the base model alone (what a full finetune's probe forward costs).

    python benchmarks/lora_forward.py            # prints the table (~1 min on 2 cores)

Median of 5 passes over the batches after one warm-up pass.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def _merged(model: Any, multiple: float) -> Iterator[None]:
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if type(m) is Linear]

    def merged_forward(layer: Any) -> Any:
        base = layer.base_layer

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            weight = base.weight
            for adapter in layer.active_adapters:
                update = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
                update = update.T if layer.fan_in_fan_out else update
                weight = weight + (layer.scaling[adapter] * multiple) * update.to(weight.dtype)
            return F.linear(x, weight, base.bias)

        return forward

    for layer in layers:
        layer.forward = merged_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def main() -> None:
    from peft import LoraConfig, get_peft_model

    from safety_guard.guard.displacement import LoraTracker
    from safety_guard.measure.prompts import load_prompts
    from safety_guard.testbed import load_testbed

    torch.manual_seed(0)
    model, tokenizer = load_testbed(progress=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)  # a trained-looking adapter (B starts at zero)
    model.eval()
    opening = tokenizer.encode("I'm sorry, but I can't", add_special_tokens=False)[:6]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in list(load_prompts("builtin:harmful:probe"))[:64]
    ]
    rows = [tokenizer.encode(t, add_special_tokens=False) + opening for t in texts]
    rows.sort(key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk])
        mask = (torch.arange(width) >= torch.tensor([[width - len(r)] for r in chunk])).long()
        batches.append((ids, mask))
    tokens = sum(len(r) for r in rows)

    def one_pass() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask, logits_to_keep=len(opening) + 1)
        return time.perf_counter() - start

    variants = {
        "adapter ×2 (the guard)": lambda: LoraTracker(model).along(model, 2.0),
        "merged ×2": lambda: _merged(model, 2.0),
        "no adapter (base model)": model.disable_adapter,
    }
    seconds = {}
    for label, context in variants.items():
        with context():
            one_pass()
            seconds[label] = statistics.median(one_pass() for _ in range(5))
    base = seconds["no adapter (base model)"]
    print(f"{len(rows)} prompts, {tokens} tokens, batches of 16, torch {torch.__version__}\n")
    print("| forward | seconds per pass | ms per token | ratio to the base model |")
    print("|---|---|---|---|")
    for label, value in seconds.items():
        print(f"| {label} | {value:.3f} | {1000 * value / tokens:.3f} | {value / base:.2f} |")


if __name__ == "__main__":
    main()
