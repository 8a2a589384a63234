"""QLoRA: the guard follows LoRA adapters on a bitsandbytes 4-bit base (its 4-bit kernels run on
the CPU), checked against the landscape of the unquantized model; the base is never moved."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model
from guard_helpers import echo_judge, make_landscape, make_trainer

from safety_guard.guard import SafetyGuardCallback
from safety_guard.landscape import LandscapeConfig, LandscapeMismatchError, compute_landscape
from safety_guard.measure.prompts import load_prompts
from safety_guard.models.fingerprint import compare_fingerprints, model_fingerprint
from safety_guard.models.parameters import UnsupportedEngineError
from safety_guard.models.quantized import dense_weight, is_quantized

bnb = pytest.importorskip("bitsandbytes")  # the qlora extra (the test command installs it)


def _qlora(folder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32
        ),
        device_map="cpu",
    )
    return get_peft_model(quantized, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))


def test_the_guard_follows_a_qlora_finetune(tmp_path, text_tokenizer):
    # hidden 128: bitsandbytes quantizes in blocks of 64 along a row
    full = make_model(vocab_size=len(text_tokenizer), hidden=128, tie=False)
    full.save_pretrained(tmp_path / "base")
    land = make_landscape(full)
    model = _qlora(tmp_path / "base")
    assert any(is_quantized(p) for p in model.parameters())
    # the fingerprint reads the 4-bit base dequantized: it matches the full-precision file
    # within the quantization error, and another model's file does not
    fingerprint = model_fingerprint(model)
    assert fingerprint["quantized"] and not compare_fingerprints(
        land.data["model"]["fingerprint"], fingerprint
    )
    other = make_landscape(make_model(vocab_size=len(text_tokenizer), hidden=128, seed=3))
    with pytest.raises(LandscapeMismatchError):
        other.check_model(model)

    prompts = list(load_prompts("builtin:harmful:probe", limit=8))
    guard = SafetyGuardCallback(
        land,
        judge=echo_judge(model, text_tokenizer, prompts),
        num_prompts=8,
        num_benign=2,
        max_new_tokens=6,
        keep_last_safe=False,
        nll_tolerance=1e9,
        max_asr_rise=30,
        restore_on_halt=False,  # keep the trained adapter, to check the displacement on it
    )
    trainer = make_trainer(model, text_tokenizer, tmp_path, [guard], steps=4, lr=1e-2)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if is_quantized(p)}
    trainer.train()
    assert guard.guard.tracker.kind == "lora" and guard.guard.probe.baseline.settings["quantized"]
    probes = [r for r in guard.records if r["event"] == "probe"]
    assert probes and all(math.isfinite(r["displacement"]) for r in probes)
    # the displacement is ‖scale·B·A‖ over the dequantized base weight's norm, layer by layer
    from peft.tuners.lora import LoraLayer

    total, count = 0.0, len(guard.guard.tracker.norms)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            delta = module.scaling["default"] * (
                module.lora_B["default"].weight @ module.lora_A["default"].weight
            )
            weight = dense_weight(module.base_layer.weight).float()
            total += float(delta.norm() / weight.norm()) ** 2
    # (the tracker sums r×r products in float32: agreement to 1e-3)
    assert guard.guard.tracker.displacement(model) == pytest.approx(
        math.sqrt(total / count), rel=1e-3
    )
    assert guard.guard.tracker.displacement(model) > 0
    # the probes moved the adapters' scaling only: the 4-bit base is bit for bit as it was
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name


def test_a_quantized_model_cannot_be_moved_for_a_landscape(tmp_path, text_tokenizer):
    make_model(vocab_size=len(text_tokenizer), hidden=128, tie=False).save_pretrained(tmp_path)
    model = _qlora(tmp_path).get_base_model()
    with pytest.raises(UnsupportedEngineError, match="unquantized model"):
        compute_landscape(
            model,
            text_tokenizer,
            LandscapeConfig(num_directions=1, alphas=(-0.1, 0.0, 0.1), search="grid"),
            progress=False,
        )
