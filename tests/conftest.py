"""Shared fixtures: tiny Llama models built from configs and a tiny offline tokenizer."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A 200-token byte-level BPE tokenizer with a chat template, trained in memory."""
    from safety_guard.prompts import builtin_records, load_text_lines

    corpus = [r["prompt"] for r in builtin_records("benign")[:100]] + load_text_lines(
        "refusals.txt"
    )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=["<unk>", "<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(
    vocab_size: int = 256, hidden: int = 32, tie: bool = True, seed: int = 0, dtype=torch.float32
) -> LlamaForCausalLM:
    """A 2-layer Llama built from a config (hidden size 32)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=2,
        pad_token_id=1,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config).to(dtype)
    # make norm weights non-trivial so "untouched" checks mean something
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p).to(dtype))
    return model


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return make_model()
