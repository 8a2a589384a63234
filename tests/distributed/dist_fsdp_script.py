"""Run by test_distributed.py under torchrun: 2 ranks, gloo, a tiny model sharded by FSDP2.

``dist_fsdp_script.py OUT TOKENIZER MODE``, MODE one of ``full``, ``lora``, ``computed``, each
alone or after ``zero3-`` or ``fsdp1-`` (``zero3`` and ``fsdp1`` alone: full finetuning): full
finetuning, or a LoRA adapter on the sharded model (the factors sharded too), or no landscape
given (computed at train begin); ``zero3*``: the model partitioned by DeepSpeed ZeRO-3 instead
of FSDP2 (its small parameters persistent, gathered between forwards, the others partitioned);
``fsdp1*``: wrapped by FSDP (1) (``use_orig_params=True``, a unit per decoder layer;
``fsdp1-noshard``: its ``NO_SHARD`` strategy, whole tensors on every rank, as on one rank).

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

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch
import torch.distributed as dist
from conftest import make_model
from guard_helpers import echo_judge, make_landscape
from transformers import TrainerControl, TrainerState

from safety_guard.engines.shards import full_tensor, local_shard, reshard, shard_model
from safety_guard.guard import SafetyGuardCallback
from safety_guard.guard.displacement import FullFinetuneTracker
from safety_guard.measure.prompts import load_prompts
from safety_guard.models.fingerprint import compare_fingerprints, model_fingerprint
from safety_guard.models.parameters import (
    UnsupportedEngineError,
    canonical_name,
    check_engine,
    perturbable_parameters,
)


class _Args:
    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.disable_tqdm = True  # (the guard shows progress bars as the trainer does)


def _shard(model, engine: str, no_shard: bool = False):
    """FSDP2 (``fully_shard`` per decoder layer, then the root), FSDP (a unit per decoder layer,
    then the root, as accelerate's ``TRANSFORMER_BASED_WRAP``) or DeepSpeed ZeRO-3, on CPU.
    Returns the model to train (FSDP wraps it)."""
    if engine == "fsdp2":
        return shard_model(model)
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from safety_guard.models.wrappers import decoder_layers

        layers = {type(m) for m in decoder_layers(model)}
        return FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy(layers),
            device_id=torch.device("cpu"),  # (without it torch asks for an accelerator)
            use_orig_params=True,
            sharding_strategy=ShardingStrategy.NO_SHARD if no_shard else None,
        )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1500},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }
    # an optimizer, so that ZeRO-3 keeps its fp32 copy of the trainable partitions
    trainable = [p for p in model.parameters() if p.requires_grad]
    deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=0.0), config=config)
    return model


def _trained(model, lora: bool):
    if lora:  # the LoRA factors (named as in the plain model: FSDP inserts its wrapper's name)
        return [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    return perturbable_parameters(model, allow_sharded=True)


def _finetune_step(ref, model, step: int, lora: bool = False) -> None:
    """The same update on both models: every rank draws it whole, the shards take their slice."""
    generator = torch.Generator().manual_seed(1000 + step)
    size = 0.0006 if lora else 0.004
    reshard(model)
    pairs = zip(_trained(ref, lora), _trained(model, lora), strict=True)
    with torch.no_grad():
        for (name, p_ref), (name_sh, p_sh) in pairs:
            assert name == name_sh, (name, name_sh)
            update = torch.randn(p_ref.shape, generator=generator) * size * step
            p_ref.add_(update)
            shard = local_shard(p_sh)
            shard.tensor.view(-1).add_(update.reshape(-1)[shard.offset : shard.stop])


def _slice_diff(pairs) -> float:
    """Largest |shard − the whole tensor's slice at the shard's range| over (whole, sharded)
    parameter pairs (FSDP: a parameter can lie wholly on another rank, its shard empty)."""
    diff = 0.0
    for p_ref, p_sh in pairs:
        shard = local_shard(p_sh)
        if shard.tensor.numel():
            want = p_ref.detach().reshape(-1)[shard.offset : shard.stop]
            diff = max(diff, float((shard.tensor.reshape(-1) - want).abs().max()))
    return diff


def _random_direction_results(ref, model, result: dict) -> None:
    """A landscape's random direction on the shards: each rank gets its range of the slice."""
    from safety_guard.landscape.directions import RandomDirection
    from safety_guard.landscape.perturb import WeightPerturbation

    pairs = list(
        zip(
            perturbable_parameters(ref),
            perturbable_parameters(model, allow_sharded=True),
            strict=True,
        )
    )
    before = [local_shard(p).tensor.clone() for _, (_, p) in pairs]
    with (
        WeightPerturbation(ref, [RandomDirection(seed=3)]) as whole,
        WeightPerturbation(model, [RandomDirection(seed=3)], allow_sharded=True) as sharded,
    ):
        whole.apply(0.3)
        sharded.apply(0.3)
        ids = torch.tensor([[5, 9, 13, 21, 34]])
        with torch.no_grad():
            logits_diff = float(
                (ref(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
            )
        slice_diff = _slice_diff((p_ref, p_sh) for (_, p_ref), (_, p_sh) in pairs)
    result["random_direction"] = {
        "slice_diff": slice_diff,
        "logits_diff": logits_diff,
        "restored": all(
            torch.equal(local_shard(p).tensor, b)
            for (_, (_, p)), b in zip(pairs, before, strict=True)
        ),
    }


def _train_step_results(ref, model, lora: bool, result: dict) -> None:
    """A real training step after the guard's probes (forward, backward, SGD): the same loss and
    the same updated weights as the whole model's, so no forward used a gathered copy of moved
    weights that FSDP had kept (each rank feeds the same batch: the averaged gradient is the
    whole model's)."""
    ids = torch.tensor([[5, 9, 13, 21, 34, 55, 89]])
    losses = {}
    for key, m in (("ref", ref), ("fsdp", model)):
        trainable = [p for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.05)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[key] = float(loss)
    reshard(model)
    pairs = list(zip(_trained(ref, lora), _trained(model, lora), strict=True))
    assert all(name == name_sh for (name, _), (name_sh, _) in pairs)
    diff = _slice_diff((p_ref, p_sh) for (_, p_ref), (_, p_sh) in pairs)
    result["train_step"] = {"loss": [losses["ref"], losses["fsdp"]], "weights_diff": diff}


def _tied_results(vocab: int, result: dict) -> None:
    """Tied embeddings under FSDP (sharded, one flat parameter holding the tie's two uses): read
    once (the plain model's names and fingerprint), moved once."""
    ref = make_model(vocab_size=vocab, tie=True)
    model = _shard(make_model(vocab_size=vocab, tie=True), "fsdp1")
    model(input_ids=torch.tensor([[1, 2]]))  # (FSDP sets its views up at the first forward)
    tied: dict = {
        "names_equal": [n for n, _ in perturbable_parameters(ref)]
        == [n for n, _ in perturbable_parameters(model, allow_sharded=True)],
        "fingerprint_problems": compare_fingerprints(
            model_fingerprint(ref), model_fingerprint(model)
        ),
    }
    _random_direction_results(ref, model, tied)
    result["tied"] = tied


def _lora_results(ref, model, out: Path, rank: int, result: dict) -> None:
    """The adapters after the run (restored on halt alike?) and the last safe adapters saved."""
    reshard(model)
    diff = 0.0
    pairs = zip(_trained(ref, True), _trained(model, True), strict=True)
    for (n_ref, p_ref), (n_sh, p_sh) in pairs:
        assert n_ref == n_sh, (n_ref, n_sh)
        diff = max(diff, float((full_tensor(p_sh) - p_ref.detach()).abs().max()))
    result["final_adapter_diff"] = diff
    # ZeRO-3: restore_on_halt reached the optimizer's fp32 copy of each partition too
    fp32_diff = 0.0
    for _, p_sh in _trained(model, True):
        optimizer = getattr(p_sh, "_z3_optimizer", None)
        if optimizer is not None:
            fp32 = optimizer.get_local_fp32_param(p_sh).reshape(-1)
            fp32_diff = max(fp32_diff, float((fp32 - p_sh.ds_tensor.float()).abs().max()))
    result["fp32_copy_diff"] = fp32_diff
    from peft import PeftModel, get_peft_model_state_dict

    peft = model if isinstance(model, PeftModel) else model.module  # (FSDP wraps the PeftModel)
    params = dict(peft.named_parameters())  # (ZeRO-3: the partitions)
    adapter = get_peft_model_state_dict(peft, params)
    current = {canonical_name(k): full_tensor(v) for k, v in adapter.items()}
    if rank == 0:
        from safetensors.torch import load_file

        saved = {}
        for key, folder in (("ref", out / "ref0"), ("fsdp", out / "fsdp")):
            path = folder / "last-safe"
            marker = json.loads((path / "safety_guard_step.json").read_text())
            saved[key] = (marker["step"], load_file(path / "adapter_model.safetensors"))
        (step_ref, a), (step_fsdp, b) = saved["ref"], saved["fsdp"]
        same = sorted(a) == sorted(b)
        result["last_safe"] = {
            "steps": [step_ref, step_fsdp],
            "same_keys": same,
            "diff": max(float((a[k] - b[k]).abs().max()) for k in a) if same else None,
            "config": (out / "fsdp" / "last-safe" / "adapter_config.json").exists(),
            # restore_on_halt: the sharded model holds the last safe adapter again
            "model_vs_saved": max(float((current[k] - b[k]).abs().max()) for k in b),
        }


def _computed_landscapes(ref, model, tokenizer, judge, out: Path, rank: int) -> None:
    """No landscape given: the guard on the shards computes it at train begin, every rank in
    lockstep, like the guard on the whole model (prompts split across ranks)."""
    options = dict(judge=judge, num_prompts=8, num_benign=2, max_new_tokens=6)
    guards = {
        "ref": SafetyGuardCallback(None, output_dir=str(out / f"ref{rank}"), **options),
        "fsdp": SafetyGuardCallback(None, output_dir=str(out / "fsdp"), **options),
    }
    models = {"ref": ref, "fsdp": model}
    shards = [
        local_shard(p).tensor.clone() for _, p in perturbable_parameters(model, allow_sharded=True)
    ]
    for key, guard in guards.items():
        state = TrainerState(is_world_process_zero=rank == 0, max_steps=4)
        guard.on_train_begin(
            _Args(str(out)), state, TrainerControl(), model=models[key], processing_class=tokenizer
        )
    after = [local_shard(p).tensor for _, p in perturbable_parameters(model, allow_sharded=True)]
    result = {
        "rank": rank,
        "landscapes": {k: g.landscape.data["directions"] for k, g in guards.items()},
        "restored": all(torch.equal(a, b) for a, b in zip(shards, after, strict=True)),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    out = Path(sys.argv[1])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mode = sys.argv[3] if len(sys.argv) > 3 else "full"
    engine = next((e for e in ("zero3", "fsdp1") if mode.startswith(e)), "fsdp2")
    ref = make_model(vocab_size=len(tokenizer), tie=False)
    model = make_model(vocab_size=len(tokenizer), tie=False)
    land = make_landscape(ref)
    prompts = list(load_prompts("builtin:harmful:probe", limit=8))
    judge = echo_judge(ref, tokenizer, prompts)
    if mode.endswith("computed"):
        model = _shard(model, engine)
        _computed_landscapes(ref, model, tokenizer, judge, out, rank)
        return
    lora = mode.endswith("lora")
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
        torch.manual_seed(0)
        ref = get_peft_model(ref, config)
        torch.manual_seed(0)
        model = get_peft_model(model, config)
    model = _shard(model, engine, no_shard=mode == "fsdp1-noshard")
    result: dict = {"rank": rank}
    try:  # code that is not shard-aware refuses shards (FSDP's NO_SHARD leaves none)
        check_engine(model)
        result["plain_check"] = "accepted"
    except UnsupportedEngineError:
        result["plain_check"] = "refused"
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
        keep_last_safe=lora,  # LoRA: gathered on every rank, written by the main one
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
    trackers = {k: g.guard.tracker for k, g in guards.items()}
    result["origin_bytes"] = {
        k: sum(t.numel() * t.element_size() for t in tr.origin.values())
        for k, tr in trackers.items()
        if isinstance(tr, FullFinetuneTracker)
    }
    result["sharded"] = trackers["fsdp"].sharded
    result["split_prompts"] = {k: not g.guard.probe.probe.lockstep for k, g in guards.items()}
    checks = []
    for step in range(1, 13):
        _finetune_step(ref, model, step, lora)
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
    if lora:
        _lora_results(ref, model, out, rank, result)
    else:
        _random_direction_results(ref, model, result)
    if mode == "fsdp1":
        _tied_results(len(tokenizer), result)
    if engine != "zero3":  # last: it trains both models (ZeRO-3 trains through its engine)
        _train_step_results(ref, model, lora, result)
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
