"""Engines safety-guard cannot move yet are refused by name, never measured wrong or hung on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_model
from guard_helpers import make_landscape, make_trainer

from safety_guard.guard import SafetyGuardCallback
from safety_guard.guard.displacement import make_tracker
from safety_guard.models.parameters import (
    UnsupportedEngineError,
    check_engine,
    perturbable_parameters,
)


def _zero3(model):
    """ZeRO-3's marks without its partitions: every parameter emptied to shape [0] and marked
    (real ZeRO-3 parameters carry their partition, ``ds_tensor``: tests/test_distributed.py)."""
    for i, p in enumerate(model.parameters()):
        p.data = torch.empty(0, dtype=p.dtype)
        p.ds_id = i
    return model


def test_zero3_marks_without_partitions_are_refused_by_name_not_read_as_zero(
    tmp_path, text_tokenizer
):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    land = make_landscape(model)
    _zero3(model)
    with pytest.raises(UnsupportedEngineError, match="DeepSpeed ZeRO-3") as err:
        make_tracker(model)
    assert "Supported:" in str(err.value) and "DDP" in str(err.value)
    guard = SafetyGuardCallback(land, num_prompts=8, min_prompts=8, num_benign=0)
    trainer = make_trainer(model, text_tokenizer, tmp_path, [guard], steps=1)
    with pytest.raises(UnsupportedEngineError, match="ZeRO-3"):
        guard.on_train_begin(
            trainer.args,
            trainer.state,
            trainer.control,
            model=model,
            processing_class=text_tokenizer,
        )


def test_quantized_base_weights_are_refused_by_name():
    model = make_model()
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = torch.nn.Parameter(
        torch.zeros(layer.weight.shape, dtype=torch.uint8), requires_grad=False
    )
    with pytest.raises(UnsupportedEngineError, match=r"up_proj.weight is uint8"):
        perturbable_parameters(model)
    marked = make_model()
    marked.model.layers[0].mlp.up_proj.weight.quant_state = object()  # bitsandbytes Params4bit
    with pytest.raises(UnsupportedEngineError, match="bitsandbytes"):
        check_engine(marked)


def _run_script(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python process (its own process group, one CPU thread); fail
    the test with its stderr if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_fsdp1_flat_parameters_refused_by_name_orig_params_read_as_the_plain_model():
    """FSDP (1) wraps on CPU with ``device_id=torch.device("cpu")`` (without it torch 2.13 asks for
    an accelerator). With ``use_orig_params=False`` only flat parameters are left: the engine
    check, the landscape's weight moves and the guard's tracker refuse it by name, saying which
    setting to change. With ``use_orig_params=True`` the shard-aware code reads the model as the
    plain one: the same parameter names (FSDP's wrapper names removed, the tied embedding once)
    and fingerprint. On one rank FSDP does not shard (``NO_SHARD``): plain code may read it too.
    (Shards, a tie on 2 ranks: tests/test_distributed.py.)"""
    script = textwrap.dedent(
        """
        import tempfile, warnings, torch, torch.distributed as dist
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from safety_guard.guard.displacement import make_tracker
        from safety_guard.models.wrappers import decoder_layers
        from safety_guard.testbed.tiny import tiny_llama
        from safety_guard.models.parameters import UnsupportedEngineError, check_engine, perturbable_parameters
        from safety_guard.models.fingerprint import compare_fingerprints, model_fingerprint
        dist.init_process_group(
            "gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1
        )
        def wrap(orig_params):
            model = tiny_llama(vocab_size=64, hidden=32, seed=0, tie=True)
            layers = {type(m) for m in decoder_layers(model)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # world size 1: FSDP switches to NO_SHARD
                return FullyShardedDataParallel(
                    model, auto_wrap_policy=ModuleWrapPolicy(layers),
                    device_id=torch.device("cpu"), use_orig_params=orig_params,
                )
        flat = wrap(False)
        flat(torch.tensor([[1, 2, 3]]))  # it runs
        for what, call in [
            ("check_engine", lambda: check_engine(flat)),
            ("perturbable_parameters", lambda: perturbable_parameters(flat, allow_sharded=True)),
            ("make_tracker", lambda: make_tracker(flat)),
        ]:
            try:
                call()
                print(what, "accepted")
            except UnsupportedEngineError as err:
                print(what, "refused:", err)
        plain = tiny_llama(vocab_size=64, hidden=32, seed=0, tie=True)
        wrapped = wrap(True)
        wrapped(torch.tensor([[1, 2, 3]]))
        names = [n for n, _ in perturbable_parameters(wrapped, allow_sharded=True)]
        print("same names", names == [n for n, _ in perturbable_parameters(plain)], len(names))
        problems = compare_fingerprints(model_fingerprint(plain), model_fingerprint(wrapped))
        print("fingerprint problems", problems)
        print("tracker", type(make_tracker(wrapped)).__name__)
        check_engine(wrapped)  # NO_SHARD (one rank): whole tensors, plain code reads them
        print("plain check accepted")
        dist.destroy_process_group()
        """
    )
    proc = _run_script(script)
    out = proc.stdout
    for what in ("check_engine", "perturbable_parameters", "make_tracker"):
        assert f"{what} refused: safety-guard cannot move" in out, out
    assert out.count("FSDP (FullyShardedDataParallel) with use_orig_params=False") == 3, out
    assert out.count("set `fsdp_use_orig_params: true`") == 3, out
    for what in ("check_engine", "perturbable_parameters", "make_tracker"):
        assert f"{what} accepted" not in out, out
    assert "same names True" in out, out
    assert "fingerprint problems []" in out, out
    assert "tracker FullFinetuneTracker" in out, out
    assert "plain check accepted" in out, out


def test_fsdp2_refused_by_name_and_moved_shard_by_shard():
    """fully_shard on one CPU process (gloo), in a subprocess."""
    script = textwrap.dedent(
        """
        import os, tempfile, torch, torch.distributed as dist
        from safety_guard.testbed.tiny import tiny_llama
        from safety_guard.models.parameters import UnsupportedEngineError, check_engine
        from torch.distributed.fsdp import fully_shard
        dist.init_process_group(
            "gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1
        )
        model = tiny_llama(vocab_size=64, hidden=32, seed=0)
        check_engine(model)  # plain: fine
        fully_shard(model)
        try:
            check_engine(model)
        except UnsupportedEngineError as err:
            print("fsdp2 refused:", err)
        # WeightPerturbation on shards: elementwise directions only, restored bit for bit
        from safety_guard.landscape.directions import RandomDirection
        from safety_guard.landscape.perturb import WeightPerturbation
        from safety_guard.engines.shards import local_shard
        from safety_guard.landscape.orthogonal import direction_slices
        # two orthogonalized random directions (a 2D landscape) on the shards: where the whole
        # orthogonalized slices put the weights
        dirs = [RandomDirection(seed=0), RandomDirection(seed=1)]
        key = "model.layers.0.mlp.up_proj.weight"
        w0 = local_shard(dict(model.named_parameters())[key]).tensor.clone()
        with WeightPerturbation(model, dirs, allow_sharded=True) as mv:
            mv.apply(0.4, -0.2)
            s1, s2 = direction_slices(dirs, key, w0)
            got = local_shard(dict(model.named_parameters())[key]).tensor
            err = float((got - (w0 + 0.4 * s1 - 0.2 * s2)).abs().max())
            print("2D on shards error below 1e-6:", err < 1e-6)
        print("2D restored:", torch.equal(local_shard(dict(model.named_parameters())[key]).tensor, w0))
        # a surface with an interpolation axis: the random axis orthogonalized against it from
        # dot products summed over the shards, as direction_slices does on whole tensors
        from safety_guard.landscape.directions import InterpolationDirection
        other = tiny_llama(vocab_size=64, hidden=32, seed=1)
        target = {n: p.detach().clone() for n, p in other.named_parameters()}
        dirs = [InterpolationDirection(target), RandomDirection(seed=2)]
        with WeightPerturbation(model, dirs, allow_sharded=True) as mv:
            mv.apply(0.5, 0.3)
            s1, s2 = direction_slices(dirs, key, w0)
            got = local_shard(dict(model.named_parameters())[key]).tensor
            err = float((got - (w0 + 0.5 * s1 + 0.3 * s2)).abs().max())
            print("interpolation x random on shards error below 1e-6:", err < 1e-6)
            dot = float((s1 * s2).sum()) / float(s1.norm() * s2.norm())
            print("orthogonal:", abs(dot) < 1e-5)
        print("plane restored:", torch.equal(local_shard(dict(model.named_parameters())[key]).tensor, w0))

        class Ones:
            elementwise = True

            def tensor(self, name, current):
                return torch.ones_like(current, dtype=torch.float32)

        params = dict(model.named_parameters())
        before = {n: local_shard(p).tensor.clone() for n, p in params.items()}
        with WeightPerturbation(model, [Ones()], orthogonalize=False, allow_sharded=True) as mv:
            mv.apply(0.5)
            model(torch.tensor([[1, 2, 3]]))  # a forward in between: FSDP2 unshards the root
            moved = local_shard(params["model.layers.0.mlp.up_proj.weight"]).tensor
            key = "model.layers.0.mlp.up_proj.weight"
            print("moved by", float((moved - before[key]).mean()))
        model(torch.tensor([[1, 2, 3]]))
        same = all(torch.equal(local_shard(p).tensor, before[n]) for n, p in params.items())
        print("restored exactly:", same)
        dist.destroy_process_group()
        """
    )
    proc = _run_script(script)
    assert "fsdp2 refused: safety-guard cannot move" in proc.stdout
    assert "FSDP2 / DTensor" in proc.stdout
    assert "2D on shards error below 1e-6: True" in proc.stdout
    assert "2D restored: True" in proc.stdout
    assert "interpolation x random on shards error below 1e-6: True" in proc.stdout
    assert "orthogonal: True" in proc.stdout and "plane restored: True" in proc.stdout
    assert "moved by 0.5" in proc.stdout
    assert "restored exactly: True" in proc.stdout
