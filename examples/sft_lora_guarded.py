"""A LoRA SFT script with the safety guard added (one line), runnable offline on the testbed.

Needs the testbed extra (TRL, and the testbed's GGUF loader): pip install "safety-guard[testbed]".

    python examples/sft_lora_guarded.py                       # harmful-compliance data: the guard halts
    python examples/sft_lora_guarded.py --data benign         # benign data: the guard lets it run
    python examples/sft_lora_guarded.py --model ./my-chat-model --landscape landscape.json

Without --landscape the guard computes a small landscape of the aligned model at train begin.
The guard is attached with ``attach(trainer)``; ``callbacks=[SafetyGuardCallback(...)]`` works
the same way. Its ``safety/*`` metrics reach the trainer's loggers either way.
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from safety_guard import SafetyGuardCallback
from safety_guard.testbed import benign_finetune_dataset, build_testbed, harmful_finetune_dataset


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="Aligned chat model (default: the testbed).")
    parser.add_argument("--landscape", default=None, help="Landscape file of the aligned model.")
    parser.add_argument("--data", choices=["harmful", "benign"], default="harmful")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default="outputs/sft_lora_guarded")
    args = parser.parse_args()

    model_path = args.model or str(build_testbed())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="float32")
    rows = (
        harmful_finetune_dataset(n=100)
        if args.data == "harmful"
        else benign_finetune_dataset(model, tokenizer, n=100)
    )
    train = Dataset.from_list(
        [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    )

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.output_dir,
            max_steps=args.steps,
            learning_rate=args.lr,
            per_device_train_batch_size=4,
            lr_scheduler_type="constant",
            logging_steps=10,
            save_strategy="no",
            report_to=[],
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    guard = SafetyGuardCallback(landscape=args.landscape).attach(trainer)  # <- the guard
    trainer.train()
    summary = guard.summary()
    print(
        f"halt step: {summary['halt_step']} ({summary['halt_reason']})  last safe step: "
        f"{summary['last_safe_step']}  warnings: {summary['warn_count']}  "
        f"largest ASR rise on the probe prompts: {summary['max_rise']}"
    )
    print(f"trajectory, plot and last safe adapter: {args.output_dir}/safety-guard/")


if __name__ == "__main__":
    main()
