"""Run by test_distributed.py under torchrun: 2 ranks, gloo, a tiny model sharded by FSDP2.

Each rank holds an unsharded reference copy of the same model next to the sharded one, applies
the same finetuning updates to both (the sharded one gets its slice of each update), and drives a
SafetyGuardCallback's hooks around each: the guard on the shards must read the same
displacement, sketch, fingerprint and lookahead as on the whole model, restore its shards bit for
bit, and take the same decisions at the same steps on both ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
import torch.distributed as dist
from conftest import make_model
from guard_helpers import echo_judge, make_landscape
from torch.distributed.fsdp import fully_shard
from transformers import TrainerControl, TrainerState

from safety_guard.guard import SafetyGuardCallback
from safety_guard.guard.displacement import FullFinetuneTracker
from safety_guard.prompts import load_prompts
from safety_guard.shards import local_shard
from safety_guard.weights import compare_fingerprints, model_fingerprint, perturbable_parameters


class _Args:
    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir


def _finetune_step(ref, model, step: int) -> None:
    """The same update on both models: every rank draws it whole, the shards take their slice."""
    generator = torch.Generator().manual_seed(1000 + step)
    pairs = zip(
        perturbable_parameters(ref),
        perturbable_parameters(model, allow_sharded=True),
        strict=True,
    )
    with torch.no_grad():
        for (name, p_ref), (name_sh, p_sh) in pairs:
            assert name == name_sh, (name, name_sh)
            update = torch.randn(p_ref.shape, generator=generator) * 0.004 * step
            p_ref.add_(update)
            shard = local_shard(p_sh)
            shard.tensor.view(-1).add_(update.reshape(-1)[shard.offset : shard.stop])


def main() -> None:
    out = Path(sys.argv[1])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ref = make_model(vocab_size=len(tokenizer), tie=False)
    model = make_model(vocab_size=len(tokenizer), tie=False)
    land = make_landscape(ref)
    prompts = list(load_prompts("builtin:harmful:probe", limit=8))
    judge = echo_judge(ref, tokenizer, prompts)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    result: dict = {"rank": rank}
    result["fingerprint_problems"] = compare_fingerprints(
        land.data["model"]["fingerprint"], model_fingerprint(model)
    )

    options = dict(
        judge=judge,
        num_prompts=8,
        min_prompts=8,
        num_benign=2,
        max_new_tokens=6,
        confidence_z=0.0,
        max_asr_rise=20,
        nll_tolerance=1e9,
        keep_last_safe=False,
    )
    guards = {
        "ref": SafetyGuardCallback(land, output_dir=str(out / f"ref{rank}"), **options),
        "fsdp": SafetyGuardCallback(land, output_dir=str(out / "fsdp"), **options),
    }
    models = {"ref": ref, "fsdp": model}
    states = {k: TrainerState(is_world_process_zero=rank == 0, max_steps=12) for k in models}
    control = TrainerControl()
    for key, guard in guards.items():
        guard.on_train_begin(
            _Args(str(out)), states[key], control, model=models[key], processing_class=tokenizer
        )
    trackers = {k: g.tracker for k, g in guards.items()}
    result["origin_bytes"] = {
        k: sum(t.numel() * t.element_size() for t in tr.origin.values())
        for k, tr in trackers.items()
        if isinstance(tr, FullFinetuneTracker)
    }
    result["sharded"] = trackers["fsdp"].sharded
    result["split_prompts"] = {k: g.probe.split_prompts for k, g in guards.items()}
    checks = []
    for step in range(1, 13):
        _finetune_step(ref, model, step)
        shards = [
            local_shard(p).tensor.clone()
            for _, p in perturbable_parameters(model, allow_sharded=True)
        ]
        for key, guard in guards.items():
            states[key].global_step = step
            guard.on_step_end(_Args(str(out)), states[key], control, model=models[key])
        after = [
            local_shard(p).tensor for _, p in perturbable_parameters(model, allow_sharded=True)
        ]
        restored = all(torch.equal(a, b) for a, b in zip(shards, after, strict=True))
        sketch = {k: tr.sketch(models[k]) for k, tr in trackers.items()}
        ids = torch.tensor([[5, 9, 13, 21, 34]])
        with torch.no_grad():
            with trackers["ref"].along(ref, 2.0):
                ahead_ref = ref(input_ids=ids).logits
            with trackers["fsdp"].along(model, 2.0):
                ahead_fsdp = model(input_ids=ids).logits
        checks.append(
            {
                "step": step,
                "restored": restored,
                "displacement": {k: tr.displacement(models[k]) for k, tr in trackers.items()},
                "sketch_diff": float((sketch["ref"] - sketch["fsdp"]).abs().max()),
                "lookahead_logits_diff": float((ahead_ref - ahead_fsdp).abs().max()),
            }
        )
    result["checks"] = checks
    result["decisions"] = {
        k: [
            (r["step"], r["event"], r.get("status"), r.get("rise"), r.get("horizon_rise"))
            for r in g.records
        ]
        for k, g in guards.items()
    }
    result["probe_displacements"] = {
        k: [r["displacement"] for r in g.records if r["event"] == "probe"]
        for k, g in guards.items()
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
