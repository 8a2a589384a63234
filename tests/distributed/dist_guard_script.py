"""Run by test_distributed.py under torchrun: 2 ranks, gloo, the probe prompts split across them.

``dist_guard_script.py OUT TOKENIZER [given|computed|zero3]``: DDP with a landscape file, or
without one (computed at train begin), or ``Trainer``'s DeepSpeed ZeRO-3 integration (on CPU:
``DS_ACCELERATOR=cpu``), where every forward is a collective and the guard moves partitions."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch
from conftest import make_model
from guard_helpers import echo_judge, make_landscape, tiny_dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from safety_guard.guard import SafetyGuardCallback
from safety_guard.measure.prompts import load_prompts


def main() -> None:
    out = Path(sys.argv[1])
    tok_dir = sys.argv[2]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = make_model(vocab_size=len(tokenizer), tie=False)
    rank = int(os.environ["RANK"])
    prompts = list(load_prompts("builtin:harmful:probe", limit=8))
    mode = sys.argv[3] if len(sys.argv) > 3 else "given"
    computed = mode == "computed"
    deepspeed = None
    if mode == "zero3":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        deepspeed = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1500},
            "zero_force_ds_cpu_optimizer": False,
        }
    guard = SafetyGuardCallback(
        None if computed else make_landscape(model),
        judge=echo_judge(model, tokenizer, prompts),
        harmful="builtin:harmful:probe",
        num_prompts=8,
        num_benign=2,
        max_new_tokens=6,
        keep_last_safe=True,
        confidence_z=0.0,
        max_asr_rise=20,
        nll_tolerance=1e9,
    )

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=30,
        per_device_train_batch_size=2,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        deepspeed=deepspeed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(tokenizer),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer),
        callbacks=[guard],
    )
    trainer.train()
    written = out / "safety-guard"
    result = {
        # the guard's on_train_end lets no rank leave before the main process has written these
        "outputs_written": (written / "summary.json").is_file()
        and (written / "trajectory.png").is_file(),
        "rank": rank,
        "global_step": trainer.state.global_step,
        "halt_step": guard.halt_step,
        "world": torch.distributed.get_world_size(),
        "decisions": [(r["step"], r.get("status"), r.get("rise")) for r in guard.records],
        "sharded": guard.guard.tracker.sharded,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # leave together (every rank has written its result) and tear the process group down, as
    # PyTorch recommends: a rank that exits with the group still up can abort in gloo's destructor
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
