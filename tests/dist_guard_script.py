"""Run by test_distributed.py under torchrun: 2 ranks, gloo, a judge that disagrees across ranks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from conftest import make_model
from guard_helpers import make_landscape, tiny_dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from safety_guard.guard import SafetyGuardCallback
from safety_guard.judges import CallableJudge


def main() -> None:
    out = Path(sys.argv[1])
    tok_dir = sys.argv[2]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = make_model(vocab_size=len(tokenizer))
    rank = int(os.environ["RANK"])
    guard = SafetyGuardCallback(
        make_landscape(model),
        check_every=1,
        probe_every=2,
        num_prompts=4,
        num_benign=2,
        max_new_tokens=2,
        lookahead=(2.0,),
        keep_last_safe=False,
        current_margin=30.0,
    )
    # rank 0 sees only unsafe answers, rank 1 only refusals: 50 % ASR overall from step 4 on.
    guard.judge = CallableJudge(lambda p, r: [rank == 0 and guard_step[0] >= 4] * len(r))
    guard_step = [0]

    class Step(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            guard_step[0] = state.global_step

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=8,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(tokenizer),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer),
        callbacks=[Step(), guard],
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
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # leave together (every rank has written its result) and tear the process group down, as
    # PyTorch recommends: a rank that exits with the group still up can abort in gloo's destructor
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


from transformers import TrainerCallback  # noqa: E402

if __name__ == "__main__":
    main()
