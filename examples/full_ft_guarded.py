"""A full-finetuning script (transformers Trainer) with the safety guard, offline on the testbed.

Needs the testbed extra (TRL, and the testbed's GGUF loader): pip install "safety-guard[testbed]".

    python examples/full_ft_guarded.py                        # harmful-compliance data, lr 2e-5
    python examples/full_ft_guarded.py --data benign

The guard keeps a copy of the pre-finetune weights on the CPU and probes θ₀ + s·δ ahead of the
current model along the finetuning direction, forward-only, when the last probe stops covering
the finetune. This script uses the one-line form, ``callbacks=[guard]``, with a fixed cadence
for comparison (``probe_every=5``; the default is adaptive).
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from safety_guard import GuardConfig, SafetyGuardCallback
from safety_guard.testbed import benign_finetune_dataset, build_testbed, harmful_finetune_dataset


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="Aligned chat model (default: the testbed).")
    parser.add_argument("--landscape", default=None, help="Landscape file of the aligned model.")
    parser.add_argument("--data", choices=["harmful", "benign"], default="harmful")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output-dir", default="outputs/full_ft_guarded")
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

    guard = SafetyGuardCallback(landscape=args.landscape, config=GuardConfig(probe_every=5))
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.output_dir,
            max_steps=args.steps,
            learning_rate=args.lr,
            per_device_train_batch_size=4,
            lr_scheduler_type="constant",
            logging_steps=5,
            save_strategy="no",
            report_to=[],
        ),
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[guard],
    )
    trainer.train()
    summary = guard.summary()
    print(
        f"halt step: {summary['halt_step']} ({summary['halt_reason']})  last safe step: "
        f"{summary['last_safe_step']}  warnings: {summary['warn_count']}  "
        f"largest ASR rise on the probe prompts: {summary['max_rise']}"
    )


if __name__ == "__main__":
    main()
