"""Shared fixtures: tiny Llama models built from configs and a tiny offline tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from safety_guard.testbed.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A 200-token byte-level BPE tokenizer with a chat template, trained in memory."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def text_tokenizer() -> PreTrainedTokenizerFast:
    """A 300-token BPE whose every token decodes to clean text (for tests that match text)."""
    return tiny_tokenizer(300, byte_level=False)


def make_model(
    vocab_size: int = 256, hidden: int = 32, tie: bool = True, seed: int = 0, dtype=torch.float32
) -> LlamaForCausalLM:
    """A 2-layer Llama built from a config (hidden size 32), with non-trivial norm weights."""
    model = tiny_llama(vocab_size=vocab_size, hidden=hidden, tie=tie, seed=seed, dtype=dtype)
    with torch.no_grad():  # make norm weights non-trivial so "untouched" checks mean something
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p).to(dtype))
    return model


def sliding_window_model(vocab_size: int, window: int = 16) -> torch.nn.Module:
    """A 2-layer Mistral built from a config whose attention sees only the last ``window``
    tokens (hidden size 32)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
    )
    torch.manual_seed(0)
    return MistralForCausalLM(config)


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return make_model()


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A tiny Llama and its tokenizer saved to a folder, as a user's model on disk."""
    folder = tmp_path / "tiny"
    make_model(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_cli(capsys, *argv):
    """``safety-guard ARGV`` in this process: (exit code, stdout, stderr)."""
    from safety_guard.cli.main import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
