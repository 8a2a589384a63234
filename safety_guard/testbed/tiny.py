"""Offline building blocks for tests and benchmarks: a tiny tokenizer and Llama models from configs.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in memory on the built-in
prompts, with a minimal chat template.

Example:
    >>> tok = tiny_tokenizer()
    >>> model = tiny_llama(vocab_size=len(tok), hidden=32)
    >>> model.config.num_hidden_layers
    2
"""

from __future__ import annotations

from typing import Any

import torch

from safety_guard.measure.prompts import builtin_records, load_text_lines

__all__ = ["CHAT_TEMPLATE", "tiny_llama", "tiny_tokenizer"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 200, byte_level: bool = True) -> Any:
    """A BPE tokenizer (``vocab_size`` ids) with a chat template.

    Special ids: ``<unk>`` 0, ``<pad>`` 1, ``<|end|>`` 2 (eos), then the role markers.

    Args:
        vocab_size: the vocabulary size to train.
        byte_level: byte-level BPE (any text, but a random model's tokens can decode to partial
            UTF-8 characters); ``False``: a sentencepiece-style BPE over the corpus' characters,
            whose every token decodes to clean text (for tests that match decoded text).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [r["prompt"] for r in builtin_records("benign")[:100]] + load_text_lines(
        "refusals.txt"
    )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    special = ["<unk>", "<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(
    vocab_size: int = 256,
    hidden: int = 32,
    num_layers: int = 2,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A Llama-shaped causal LM with random weights built from a config (eos id 2, pad id 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate or 2 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=512,
            tie_word_embeddings=tie,
            eos_token_id=2,
            pad_token_id=1,
            bos_token_id=None,
        )
        model = LlamaForCausalLM(config).to(dtype)
    finally:
        torch.random.set_rng_state(generator_state)  # leave the caller's global RNG alone
    return model.eval()
