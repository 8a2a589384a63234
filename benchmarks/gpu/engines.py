"""What the guard and the landscape cost on the engines big models train with, on one GPU.

One script for a GPU machine (under 8 minutes on one H200 for the 7B-shaped model): each
case runs in a fresh ``torchrun --standalone --nproc_per_node 1`` process (world size 1 still
runs the sharded code paths), builds a Llama model from a config with random weights (7B-shaped:
hidden 4096, 32 layers, MLP 11008, in bf16; the vocabulary is the offline test tokenizer's, so
nothing is downloaded) and measures:

* **training step**: mean wall time of an optimizer step (batch 4 × 512 tokens, AdamW) after
  one warm-up step;
* **guard setup**: the tracker (θ₀ for full finetuning, norms for LoRA) and the guard's baseline
  of the aligned model (200 probe prompts answered by generation, once per run — or read from the
  landscape file);
* **cheap check**: displacement and sketch, every step;
* **probe**: θ₀ + 2·δ scored on all 200 probe prompts, forward only (a routine probe stops after
  30 when nothing changed), and **confirmation**: 32 flagged prompts judged by generation;
* **landscape point** (full-weight cases): one move along a random direction, 80 prompts
  generated and judged, the capability NLL, the restore;
* peak GPU memory (``torch.cuda.max_memory_allocated``) and peak host RSS of the process.

A random model refuses nothing, so the guard's judge is made of the model's own first answer
tokens (its "refusal phrases" are the decoded first 3 tokens of each answer at θ₀): every
prompt gets an opening to teacher-force, as an aligned model's would.

Cases: ``lora`` and ``full`` (one process, no sharding), ``fsdp2-full`` and ``fsdp2-lora``
(``fully_shard`` per decoder layer, then the root), ``qlora`` (bitsandbytes 4-bit NF4 base, LoRA
r 16), ``zero3-full`` and ``zero3-lora`` (DeepSpeed ZeRO-3, ``deepspeed.initialize``: its fp32
master weights make AdamW's states too big for one GPU at 7B, so the full case trains with SGD;
the step time is DeepSpeed's ``engine.backward``/``engine.step``); not run unless asked,
``fsdp1-full`` and ``fsdp1-lora`` (FSDP (1), ``use_orig_params=True``, a unit per decoder layer;
on one GPU FSDP switches to ``NO_SHARD``, so they shard only with ``--nproc`` ≥ 2).

    python benchmarks/gpu/engines.py                 # on a GPU machine: the table, ~6 min
    python benchmarks/gpu/engines.py --tiny          # a dry run anywhere (CPU: a tiny model)
    python benchmarks/gpu/engines.py --tiny --nproc 2   # FSDP2, ZeRO-3 on 2 CPU processes (gloo)
    python benchmarks/gpu/engines.py --cases lora fsdp2-full
    python benchmarks/gpu/engines.py --tiny --nproc 2 --cases fsdp1-full fsdp1-lora

Writes ``benchmarks/results/gpu_engines[_tiny].md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CASES = ("lora", "full", "fsdp2-lora", "fsdp2-full", "qlora", "zero3-full", "zero3-lora")
#: Not run by default: on one GPU FSDP (1) switches to NO_SHARD, so they shard with --nproc ≥ 2.
EXTRA_CASES = ("fsdp1-full", "fsdp1-lora")
SHARDED = ("fsdp2", "fsdp1", "zero3")
SHAPES = {
    "7b": {"hidden": 4096, "num_layers": 32, "intermediate": 11008, "heads": 32, "kv_heads": 32},
    "tiny": {"hidden": 128, "num_layers": 2, "intermediate": 256, "heads": 4, "kv_heads": 2},
}
RESULTS = Path(__file__).resolve().parent.parent / "results"


def _device() -> Any:
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: Any, fn: Any) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _build(shape: str, vocab: int, device: Any, dtype: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _own_judge(model: Any, tokenizer: Any, prompts: list[str]) -> Any:
    """A keyword judge whose refusal phrases are the model's own first answer tokens."""
    from safety_guard.measure.generation import generate_responses
    from safety_guard.measure.judges import KeywordJudge

    gen = generate_responses(model, tokenizer, prompts, max_new_tokens=3, batch_size=32)
    phrases = {tokenizer.decode(ids[:3], skip_special_tokens=True) for ids in gen.token_ids}
    return KeywordJudge(sorted(p for p in phrases if len(p.strip()) >= 2) or ["."])


def _peak_host_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, shape: str) -> dict[str, Any]:
    """One case in this process (under torchrun, world size 1)."""
    import torch
    import torch.distributed as dist

    from safety_guard.engines.shards import shard_model
    from safety_guard.guard import GuardConfig
    from safety_guard.guard.displacement import make_tracker
    from safety_guard.guard.probing import GuardProbe
    from safety_guard.measure.prompts import load_prompts
    from safety_guard.testbed.tiny import tiny_tokenizer

    device = _device()
    row: dict[str, Any] = {"case": case}
    zero3 = case.startswith("zero3")
    if zero3:
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a dry run without a GPU
        try:
            import deepspeed
        except ImportError:
            row["note"] = "not run: deepspeed is not installed"
            return row
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    tokenizer = tiny_tokenizer()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lora = case == "qlora" or case.endswith("lora")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = _build(shape, len(tokenizer), device, dtype)
    if case == "qlora":
        model = _quantized(model, shape, dtype, device)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    params = sum(p.numel() for p in model.parameters())  # (before sharding: whole tensors)
    row["parameters (M)"] = round(params / 1e6, 1)
    if case.startswith("fsdp2"):
        shard_model(model)
    if case.startswith("fsdp1"):
        model = _fsdp1(model, device)
    engine = _zero3(model, lora, dtype) if zero3 else None
    row["build s"] = round(time.perf_counter() - start, 1)

    prompts = list(load_prompts("builtin:harmful:probe"))
    judge = _own_judge(model, tokenizer, prompts)
    config = GuardConfig()
    probe = GuardProbe(model, tokenizer, config, judge=judge)
    tracker, seconds = _timed(device, lambda: make_tracker(model))
    row["guard tracker s"] = round(seconds, 2)
    _, seconds = _timed(device, lambda: probe.prepare(model, probe.num_prompts))
    _, cap = _timed(device, lambda: probe.prepare_capability(model))
    row["guard baseline s"] = round(seconds + cap, 2)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if zero3 else torch.optim.AdamW(trainable, lr=1e-5 if not lora else 2e-4)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(3, len(tokenizer), (4, 512), generator=generator).to(device)
    model.train()

    def step() -> None:
        if engine is not None:
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            return
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _timed(device, step)  # warm-up
    steps = [_timed(device, step)[1] for _ in range(2)]
    row["train step s"] = round(sum(steps) / len(steps), 3)
    model.eval()

    _, seconds = _timed(device, lambda: (tracker.sketch(model), tracker.displacement(model)))
    row["cheap check s"] = round(seconds, 4)

    def at(multiple: float) -> Any:
        return tracker.along(model, multiple)

    state, seconds = _timed(device, lambda: probe.measure_along(model, at, 2.0, full=True))
    row["probe 200 fwd s"] = round(seconds, 2)
    row["probe tokens"] = state.tokens
    indices = list(range(32))
    state.flagged = [True] * len(state.flagged)  # judge 32 prompts whatever the screen said

    def confirm() -> Any:
        with tracker.along(model, 2.0):
            return probe.confirm(model, state, indices)

    _, seconds = _timed(device, confirm)
    row["confirm 32 s"] = round(seconds, 2)  # (early stop: the judge's phrases come first)
    from safety_guard.measure.generation import generate_responses

    _, seconds = _timed(
        device,
        lambda: generate_responses(
            model, tokenizer, prompts[:32], max_new_tokens=24, batch_size=32
        ),
    )
    row["generate 32x24 s"] = round(seconds, 2)  # what a real confirmation decodes at most
    row["probe / step"] = round(row["probe 200 fwd s"] / row["train step s"], 2)
    if not lora:
        row["landscape point s"] = round(_landscape_point(model, tokenizer, judge, device), 2)
    if device.type == "cuda":
        row["peak GPU GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    from safety_guard.engines.collectives import all_gather_objects

    row["ranks"] = dist.get_world_size()
    row["peak host MiB per rank"] = all_gather_objects(round(_peak_host_mib()))
    return row


def _fsdp1(model: Any, device: Any) -> Any:
    """FSDP (1), a unit per decoder layer then the root (accelerate's TRANSFORMER_BASED_WRAP),
    ``use_orig_params=True``."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from safety_guard.models.wrappers import decoder_layers

    layers = {type(m) for m in decoder_layers(model)}
    device_id = device if device.type == "cuda" else torch.device("cpu")
    return FullyShardedDataParallel(
        model, auto_wrap_policy=ModuleWrapPolicy(layers), device_id=device_id, use_orig_params=True
    )


def _zero3(model: Any, lora: bool, dtype: Any) -> Any:
    """``deepspeed.initialize`` with ZeRO-3 (batch 4, bf16 on a GPU): the engine; the guard
    works on ``model``, whose parameters are now partitions. AdamW for LoRA, SGD for the whole
    model (ZeRO-3 keeps fp32 master weights: AdamW's states would not fit one GPU at 7B)."""
    import deepspeed
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = (
        torch.optim.AdamW(trainable, lr=2e-4) if lora else torch.optim.SGD(trainable, lr=1e-5)
    )
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,  # SGD
        "bf16": {"enabled": dtype == torch.bfloat16},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _quantized(model: Any, shape: str, dtype: Any, device: Any) -> Any:
    """The same random model, saved and loaded back with a bitsandbytes 4-bit NF4 base."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tempfile.mkdtemp(prefix="sg-qlora-")
    model.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        ),
        device_map={"": device.index if device.type == "cuda" else "cpu"},
    )


def _landscape_point(model: Any, tokenizer: Any, judge: Any, device: Any) -> float:
    """One landscape point: move along a random direction, 80 prompts and capability, restore."""
    from safety_guard.landscape.directions import RandomDirection
    from safety_guard.landscape.perturb import WeightPerturbation
    from safety_guard.measure.probe import ProbeConfig, SafetyProbe

    probe = SafetyProbe(model, tokenizer, ProbeConfig(), judge=judge)
    probe.prepare()

    def point() -> None:
        with WeightPerturbation(model, [RandomDirection(seed=0)], allow_sharded=True) as move:
            move.apply(0.1)
            probe.evaluate()

    return _timed(device, point)[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    every = CASES + EXTRA_CASES
    parser.add_argument(
        "--cases", nargs="+", choices=every, default=list(CASES), help=f"Default: {CASES}."
    )
    parser.add_argument("--tiny", action="store_true", help="A tiny model (a dry run, any CPU).")
    parser.add_argument("--case", choices=every, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=150.0, help="Seconds per case.")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="Processes for the FSDP and ZeRO-3 cases (one per GPU; on a CPU, gloo processes).",
    )
    args = parser.parse_args()
    shape = "tiny" if args.tiny else "7b"
    if args.case:
        row = run_case(args.case, shape)
        if int(os.environ.get("RANK", "0")) == 0:
            args.result_file.write_text(json.dumps(row))
        import torch.distributed as dist

        if dist.is_initialized():  # (a process group left to the interpreter's exit can abort)
            dist.barrier()
            dist.destroy_process_group()
        return
    rows = []
    for case in args.cases:
        result = RESULTS / f".gpu_engines_{case}.json"
        result.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(args.nproc if case.startswith(SHARDED) else 1),
            str(Path(__file__).resolve()),
            "--case",
            case,
            "--result-file",
            str(result),
            *(["--tiny"] if args.tiny else []),
        ]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=args.timeout, check=False)
            failed = proc.returncode != 0 or not result.exists()
            note = f"failed (exit {proc.returncode})" if failed else None
        except subprocess.TimeoutExpired:
            note = f"timed out after {args.timeout:g} s"
        row = json.loads(result.read_text()) if result.exists() else {"case": case}
        result.unlink(missing_ok=True)
        if note:
            row["note"] = note
        row["wall s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    _write(rows, shape, args.nproc)


def _write(rows: list[dict[str, Any]], shape: str, nproc: int) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from _common import markdown_table

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    table = [{k: r.get(k, "") for k in keys} for r in rows]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    text = (
        f"## Engines on one GPU: {gpu}, {SHAPES[shape]} Llama shape\n\n"
        f"Command: `python benchmarks/gpu/engines.py{' --tiny' if shape == 'tiny' else ''}"
        f"{f' --nproc {nproc}' if nproc > 1 else ''}`; "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}.\n\n"
        + markdown_table(table)
        + "\n"
    )
    print(text)
    suffix = ("_tiny" if shape == "tiny" else "") + (f"_nproc{nproc}" if nproc > 1 else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"gpu_engines{suffix}.md").write_text(text)
    (RESULTS / f"gpu_engines{suffix}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
