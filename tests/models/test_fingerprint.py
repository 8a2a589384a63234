"""The model fingerprint that ties a landscape file to its model: every weight tensor's norm and
random projection, dtype-independent, blind to unmerged adapters, read from a model or from its
safetensors checkpoint; version-1 fingerprints (4 sampled tensors) still compare."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import make_model

from safety_guard.landscape import Landscape, LandscapeMismatchError
from safety_guard.models.fingerprint import (
    FINGERPRINT_VERSION,
    _tensor_stats,
    checkpoint_fingerprint,
    compare_fingerprints,
    model_fingerprint,
)


def _landscape(model: torch.nn.Module, name: str = "tiny-base") -> Landscape:
    """A landscape file's model part for ``model`` (all that check_model reads)."""
    return Landscape(
        {"model": {"name": name, "dtype": "float32", "fingerprint": model_fingerprint(model)}}
    )


def _merged_lora(base: torch.nn.Module, size: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """``base`` with a LoRA on q_proj and v_proj (PEFT's default targets) whose nonzero B makes
    each update ``size`` of its weight's norm, merged into the weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for module in peft.modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                weight = module.base_layer.weight
                b, a = module.lora_B["default"].weight, module.lora_A["default"].weight
                b.normal_()
                update = module.scaling["default"] * (b @ a)
                b.mul_(size * weight.norm() / update.norm())
    return peft.merge_and_unload()


def test_a_merged_lora_on_q_and_v_is_another_model():
    base = make_model()
    merged = _merged_lora(base)
    changed = 0
    for (name, w0), (name_m, w1) in zip(
        base.named_parameters(), merged.named_parameters(), strict=True
    ):
        assert name == name_m
        rel = float((w1 - w0).detach().norm() / w0.norm())
        if "q_proj" in name or "v_proj" in name:
            changed += 1
            # a change of 5 % of each weight's norm, that moves its norm by under 2 %
            assert rel == pytest.approx(0.05, rel=1e-3)
            assert abs(float(w1.norm() / w0.norm()) - 1) < 0.02
        else:
            assert rel == 0.0
    assert changed == 4
    land = _landscape(base)
    with pytest.raises(LandscapeMismatchError, match=r"another model \('tiny-base'\)") as err:
        land.check_model(merged)
    assert "self_attn.q_proj.weight: weights differ" in str(err.value) or (
        "self_attn.v_proj.weight: weights differ" in str(err.value)
    )
    land.check_model(base)  # (the base still matches its own file)


def test_the_same_weights_in_bf16_or_fp16_match_and_a_merged_lora_in_bf16_does_not():
    base = make_model()
    land = _landscape(base)
    for dtype in (torch.bfloat16, torch.float16):
        land.check_model(make_model(dtype=dtype))
    _landscape(make_model(dtype=torch.bfloat16)).check_model(base)  # a bf16 file, an fp32 model
    with pytest.raises(LandscapeMismatchError, match="weights differ"):
        land.check_model(_merged_lora(base).to(torch.bfloat16))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_an_unmerged_fresh_lora_is_the_base_model(targets):
    from peft import LoraConfig, get_peft_model

    base = make_model()
    expected = model_fingerprint(base)
    peft = get_peft_model(make_model(), LoraConfig(r=4, target_modules=targets))
    assert any("lora_B" in n for n, _ in peft.named_parameters())
    actual = model_fingerprint(peft)  # adapter factors are not part of it
    assert [t["name"] for t in actual["tensors"]] == [t["name"] for t in expected["tensors"]]
    assert compare_fingerprints(expected, actual) == []
    _landscape(base).check_model(peft)


@pytest.mark.parametrize("tie", [True, False])
def test_a_checkpoint_folder_has_the_fingerprint_of_the_model_loaded_from_it(tmp_path, tie):
    model = make_model(tie=tie)
    model.save_pretrained(tmp_path / "one")
    # in bf16, in files of at most 20 KB (with model.safetensors.index.json)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(
        tmp_path / "sharded", max_shard_size="20KB"
    )
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    expected = model_fingerprint(model)
    names = [t["name"] for t in expected["tensors"]]
    assert ("lm_head.weight" in names) != tie
    for folder in ("one", "sharded"):
        actual = checkpoint_fingerprint(tmp_path / folder)
        assert [t["name"] for t in actual["tensors"]] == names
        assert actual["architecture"] == expected["architecture"]
        assert compare_fingerprints(expected, actual, what="checkpoint") == []
        assert compare_fingerprints(actual, expected) == []
        _landscape(model).check_checkpoint(tmp_path / folder)
    # the file's own weights, bit for bit: the same numbers as the model's fingerprint
    for a, b in zip(
        expected["tensors"], checkpoint_fingerprint(tmp_path / "one")["tensors"], strict=True
    ):
        assert a["projection"] == pytest.approx(b["projection"], rel=1e-9, abs=1e-9)
        assert a["norm"] == pytest.approx(b["norm"], rel=1e-9)
    # the checkpoint of the model it was loaded from: the same fingerprint too
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    assert (
        compare_fingerprints(checkpoint_fingerprint(tmp_path / "one"), model_fingerprint(loaded))
        == []
    )


def test_another_models_checkpoint_folder_is_refused_naming_the_tensors(tmp_path):
    base = make_model()
    land = _landscape(base)
    make_model(seed=3).save_pretrained(tmp_path / "other")
    _merged_lora(base).save_pretrained(tmp_path / "merged")
    with pytest.raises(LandscapeMismatchError, match=r"another model .* the checkpoint in"):
        land.check_checkpoint(tmp_path / "other")
    with pytest.raises(LandscapeMismatchError, match=r"proj\.weight: weights differ") as err:
        land.check_checkpoint(tmp_path / "merged")
    assert "checkpoint" in str(err.value)
    make_model(hidden=64).save_pretrained(tmp_path / "bigger")
    problems = compare_fingerprints(
        land.data["model"]["fingerprint"],
        checkpoint_fingerprint(tmp_path / "bigger"),
        what="checkpoint",
    )
    assert "config hidden_size: file has 32, checkpoint has 64" in problems
    with pytest.raises(FileNotFoundError, match="No safetensors checkpoint"):
        land.check_checkpoint(tmp_path)


def _version_1(fingerprint: dict) -> dict:
    """The version-1 fingerprint of the same model: 4 tensors, their norms and samples."""
    return {
        "architecture": fingerprint["architecture"],
        "num_parameters": fingerprint["num_parameters"],
        "tensors": [
            {k: t[k] for k in ("name", "shape", "norm", "samples")}
            for t in fingerprint["tensors"]
            if "samples" in t
        ],
    }


def test_a_version_1_fingerprint_still_compares(tmp_path):
    model = make_model()
    fingerprint = model_fingerprint(model)
    assert fingerprint["version"] == FINGERPRINT_VERSION == 2
    old = _version_1(fingerprint)
    assert len(old["tensors"]) == 4 and all(len(t["samples"]) == 16 for t in old["tensors"])
    Landscape({"model": {"name": "old", "fingerprint": old}}).check_model(
        make_model(dtype=torch.bfloat16)
    )
    model.save_pretrained(tmp_path / "ckpt")
    assert compare_fingerprints(old, checkpoint_fingerprint(tmp_path / "ckpt")) == []
    problems = compare_fingerprints(old, model_fingerprint(make_model(seed=3)))
    assert any("sampled values differ" in p or "norm" in p for p in problems), problems
    # a sampled value changed (its norm within tolerance): version 1 sees it, as it did, and
    # version 2 sees it in the projection
    sampled = old["tensors"][1]["name"]
    changed = make_model()
    with torch.no_grad():
        dict(changed.named_parameters())[sampled].view(-1)[0] += 0.05
    changed_fingerprint = model_fingerprint(changed)
    problems = compare_fingerprints(old, changed_fingerprint)
    assert len(problems) == 1 and problems[0].startswith(f"tensor {sampled}: sampled values"), (
        problems
    )
    problems = compare_fingerprints(fingerprint, changed_fingerprint)
    assert len(problems) == 1 and problems[0].startswith(f"tensor {sampled}: weights differ"), (
        problems
    )
    # a version-2 fingerprint against a version-1 file, and a real version-1 file against itself
    assert compare_fingerprints(fingerprint, old) == []
    root = Path(__file__).resolve().parents[2]
    testbed = json.loads((root / "benchmarks/results/testbed_landscape.json").read_text())
    stored = testbed["model"]["fingerprint"]
    assert "version" not in stored and compare_fingerprints(stored, stored) == []
    assert "config hidden_size: file has 576, model has 32" in compare_fingerprints(
        stored, fingerprint
    )


def test_partial_projections_over_shards_add_up_to_the_whole_tensor():
    """Shards at any offset (across blocks of the sign table) sum to the whole tensor's numbers:
    what FSDP2, FSDP and ZeRO-3 ranks all-reduce."""
    torch.manual_seed(0)
    flat = torch.randn(2_500_000)
    index = torch.tensor([0, 1_048_575, 1_048_576, 2_499_999])
    whole = _tensor_stats([(0, flat)], 12345, index)
    cuts = [0, 700_001, 1_048_577, 2_100_000, 2_500_000]
    parts = [_tensor_stats([(a, flat[a:b])], 12345, index) for a, b in itertools.pairwise(cuts)]
    summed = [sum(p[i] for p in parts) for i in range(len(whole))]
    assert summed[0] == pytest.approx(whole[0], rel=1e-12)
    assert summed[1] == pytest.approx(whole[1], rel=1e-9, abs=1e-9 * whole[0] ** 0.5)
    assert summed[2:] == whole[2:] == [float(v) for v in flat[index].double()]
    # the projection of random weights is about N(0, ‖w‖²): a sign per element, not a constant
    assert abs(whole[1]) < 5 * whole[0] ** 0.5
    assert _tensor_stats([(0, torch.ones(3_000_000))], 1, None)[1] ** 2 < 25 * 3_000_000


def test_a_4bit_base_reads_the_same_after_bitsandbytes_repacks_it_for_the_cpu(tmp_path):
    """bitsandbytes switches 4-bit weights to its AVX512-BF16 CPU layout at the first inference
    forward (on such CPUs): they dequantize to the same weights, the fingerprint matches the
    full-precision model's (projections within the quantization error)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from safety_guard.models.quantized import dense_weight, is_quantized

    full = make_model(hidden=128, tie=False)
    full.save_pretrained(tmp_path)
    expected = model_fingerprint(full)
    for double in (False, True):
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_compute_dtype=torch.float32,
                bnb_4bit_use_double_quant=double,
            ),
            device_map="cpu",
        ).eval()
        before = {
            n: dense_weight(p).float() for n, p in model.named_parameters() if is_quantized(p)
        }
        fingerprint = model_fingerprint(model)
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
        for name, param in model.named_parameters():
            if name in before:
                diff = (dense_weight(param).float() - before[name]).norm() / before[name].norm()
                assert float(diff) < 5e-3, name
        after = model_fingerprint(model)
        assert (
            compare_fingerprints(expected, after) == [] == compare_fingerprints(fingerprint, after)
        )
        for a, b in zip(fingerprint["tensors"], after["tensors"], strict=True):
            assert abs(a["projection"] - b["projection"]) < 0.02 * a["norm"], a["name"]
        # within the quantization error of the full-precision weights: ~0.1 of the norm
        for a, b in zip(expected["tensors"], after["tensors"], strict=True):
            assert abs(a["projection"] - b["projection"]) < 0.5 * a["norm"], a["name"]
