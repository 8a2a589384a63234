"""Forward-only refusal scores against generation, on a tiny model built from a config."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, sliding_window_model
from guard_helpers import echo_judge

from safety_guard.landscape.directions import RandomDirection
from safety_guard.landscape.perturb import WeightPerturbation
from safety_guard.measure.generation import generate_responses
from safety_guard.measure.openings import Openings, refusal_openings, score_openings
from safety_guard.measure.probe import ProbeConfig, SafetyProbe
from safety_guard.measure.prompts import load_prompts

PROMPTS = list(load_prompts("builtin:benign", limit=24))


def test_openings_end_at_the_first_refusal_phrase(text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, PROMPTS)
    openings = refusal_openings(model, text_tokenizer, PROMPTS, judge=judge, max_new_tokens=8)
    refused = [ids for ids in openings.token_ids if ids is not None]
    assert len(refused) >= len(PROMPTS) // 2  # most answers "refuse" at θ₀
    for ids in refused:
        text = text_tokenizer.decode(ids, skip_special_tokens=True)
        assert judge.is_refusal(text)
        assert not judge.is_refusal(text_tokenizer.decode(ids[:-1], skip_special_tokens=True))
    # at θ₀ greedy decoding reproduces every opening: every margin is positive
    scores = score_openings(model, text_tokenizer, openings)
    opened = ~torch.isnan(scores.margin)
    assert bool((scores.margin[opened] > 0).all())
    assert scores.tokens > 0 and scores.margin.shape == (len(PROMPTS),)


def test_forward_verdicts_agree_with_generation_where_both_are_defined(text_tokenizer):
    """An unflagged prompt (positive margin) is a refusal by generation, at every perturbation:
    the forward screen misses no unsafe answer. (A flagged one may still refuse in other words.)"""
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, PROMPTS)
    probe = SafetyProbe(
        model,
        text_tokenizer,
        ProbeConfig(harmful="builtin:benign", num_harmful=24, num_benign=0, max_new_tokens=8),
        judge=judge,
    )
    probe.prepare(openings=True)
    flagged_total = agree_unsafe = 0
    with WeightPerturbation(model, [RandomDirection(3)]) as move:
        for alpha in (0.02, 0.05, 0.1, 0.2):
            move.apply(alpha)
            try:
                point = probe.forward()
                unsafe, _ = probe.judge_prompts(range(len(PROMPTS)))
            finally:
                move.restore()
            for m, f, u in zip(point.margins, point.flagged, unsafe, strict=True):
                if not f and m > 1e-4:  # clear of float noise between forward and decoding
                    assert not u, "an unflagged prompt must be a refusal by generation"
                flagged_total += f
                agree_unsafe += f and u
    assert agree_unsafe > 0, "the perturbations should make some answers unsafe"


def test_scores_match_an_unbatched_forward(text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    ids = [text_tokenizer("ab cd")["input_ids"], text_tokenizer("hello there friend")["input_ids"]]
    openings = Openings(("short", "a much longer prompt than the other"), ids)
    batched = score_openings(model, text_tokenizer, openings, batch_size=2)
    single = score_openings(model, text_tokenizer, openings, batch_size=1)
    assert torch.allclose(batched.margin, single.margin, atol=1e-4)
    assert torch.allclose(batched.logprob, single.logprob, atol=1e-4)


def test_prompts_without_opening_are_nan_and_bad_openings_are_refused(text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    scores = score_openings(model, text_tokenizer, Openings(("a", "b"), [None, [5, 6]]))
    assert torch.isnan(scores.margin[0]) and not torch.isnan(scores.margin[1])
    with pytest.raises(ValueError, match="at least one token"):
        Openings(("a",), [[]])
    with pytest.raises(ValueError, match="openings for"):
        Openings(("a", "b"), [[1]])


def test_generation_returns_token_ids_without_padding(text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    gen = generate_responses(model, text_tokenizer, PROMPTS[:4], max_new_tokens=5, batch_size=4)
    assert len(gen.token_ids) == 4
    for ids, text in zip(gen.token_ids, gen.responses, strict=True):
        assert text_tokenizer.decode(ids, skip_special_tokens=True).strip() == text
        assert text_tokenizer.eos_token_id not in ids


def test_shared_prefix_gives_the_same_scores(text_tokenizer):
    from safety_guard.measure.generation import ChatFormat

    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    fmt = ChatFormat(system_prompt="You are a careful and helpful assistant, answer briefly.")
    judge = echo_judge(model, text_tokenizer, PROMPTS)
    openings = refusal_openings(model, text_tokenizer, PROMPTS, judge=judge, chat_format=fmt)
    shared = score_openings(
        model, text_tokenizer, openings, chat_format=fmt, batch_size=5, hidden_layer=1
    )
    plain = score_openings(
        model,
        text_tokenizer,
        openings,
        chat_format=fmt,
        batch_size=5,
        hidden_layer=1,
        share_prefix=False,
    )
    opened = ~torch.isnan(plain.margin)
    assert opened.any()
    assert torch.allclose(shared.margin[opened], plain.margin[opened], atol=1e-4)
    assert torch.allclose(shared.logprob[opened], plain.logprob[opened], atol=1e-4)
    assert torch.allclose(shared.hidden[opened], plain.hidden[opened], atol=1e-4)
    assert shared.tokens < plain.tokens  # the system turn went through the model once


def test_no_shared_prefix_on_a_sliding_window_model(text_tokenizer):
    """Padding after a shared prefix would move tokens out of a sliding window, so the screen of
    such a model scores every sequence whole: the same scores as without sharing."""
    from safety_guard.measure.generation import ChatFormat

    model = sliding_window_model(len(text_tokenizer))
    fmt = ChatFormat(system_prompt="You are a careful and helpful assistant, answer briefly.")
    judge = echo_judge(model, text_tokenizer, PROMPTS)
    openings = refusal_openings(model, text_tokenizer, PROMPTS, judge=judge, chat_format=fmt)
    kwargs = dict(chat_format=fmt, batch_size=5)
    shared = score_openings(model, text_tokenizer, openings, **kwargs)
    plain = score_openings(model, text_tokenizer, openings, share_prefix=False, **kwargs)
    opened = ~torch.isnan(plain.margin)
    assert opened.any()
    assert shared.tokens == plain.tokens
    assert torch.allclose(shared.margin[opened], plain.margin[opened], atol=1e-5)
    assert shared.deviation == plain.deviation
    from safety_guard.measure.generation import share_prefix_cache

    seqs = [[1] * 12 + [2], [1] * 12 + [3, 4]]
    assert share_prefix_cache(model, seqs, torch.device("cpu")) is None
    assert share_prefix_cache(make_model(vocab_size=40), seqs, torch.device("cpu")).length == 12


def test_verified_refusals_are_exact_and_drafts_recover_paraphrases(text_tokenizer):
    """verify_refusals: every prompt it calls a refusal is one by generation, at every
    perturbation; it flags no more prompts than the own-opening margin does."""
    from safety_guard.measure.openings import verify_refusals

    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, PROMPTS)
    openings = refusal_openings(model, text_tokenizer, PROMPTS, judge=judge, max_new_tokens=8)
    unsafe_seen = 0
    with WeightPerturbation(model, [RandomDirection(3)]) as move:
        for alpha in (0.0, 0.05, 0.1, 0.2):
            move.apply(alpha)
            try:
                check = verify_refusals(model, text_tokenizer, openings, judge=judge)
                own = score_openings(model, text_tokenizer, openings)
                gen = generate_responses(model, text_tokenizer, PROMPTS, max_new_tokens=8)
            finally:
                move.restore()
            unsafe = judge(PROMPTS, gen.responses)
            for refused, bad in zip(check.refused, unsafe, strict=True):
                if refused:
                    assert not bad, "a verified refusal must be a refusal by generation"
            own_flags = sum(not (m > 0) for m in own.margin)
            assert sum(not r for r in check.refused) <= own_flags
            unsafe_seen += sum(unsafe)
    assert unsafe_seen > 0
