"""Prompt loaders, chat formatting, batched generation, judges and the capability measure."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_model, sliding_window_model

from safety_guard.measure.generation import (
    ChatFormat,
    MissingChatTemplateError,
    generate_responses,
    sequence_nll,
)
from safety_guard.measure.judges import CallableJudge, KeywordJudge, PipelineJudge
from safety_guard.measure.prompts import builtin_records, load_prompts, load_text_lines


def test_builtin_sets_sizes_and_disjoint_splits():
    harmful = load_prompts("builtin:harmful")
    assert len(harmful) >= 100 and harmful.name == "builtin:harmful:heldout"
    records = builtin_records("harmful")
    by_split = {}
    for r in records:
        by_split.setdefault(r["split"], set()).add(r["prompt"])
    assert set(by_split) == {"align", "attack", "heldout", "probe"}
    assert not (by_split["heldout"] & (by_split["align"] | by_split["attack"]))
    assert not (by_split["probe"] & (by_split["align"] | by_split["attack"] | by_split["heldout"]))
    assert len(load_prompts("builtin:harmful:probe")) == 200
    benign = builtin_records("benign")
    held = {r["prompt"] for r in benign if r["split"] == "heldout"}
    assert not held & {r["prompt"] for r in benign if r["split"] != "heldout"}
    assert load_prompts("builtin:harmful:align").name == "builtin:harmful:align"
    with pytest.raises(ValueError, match="splits"):
        load_prompts("builtin:harmful:nope")
    assert harmful.sha256 == load_prompts("builtin:harmful").sha256
    assert harmful.sha256 != harmful.head(10).sha256


def test_refusal_and_compliance_data_against_judge():
    judge = KeywordJudge()
    assert all(judge.is_refusal(r) for r in load_text_lines("refusals.txt"))
    assert not any(judge.is_refusal(c) for c in load_text_lines("compliance.txt"))
    assert len(judge.keywords) == 29


def test_every_refusal_opens_with_a_judge_phrase():
    """A model trained on these recombines their openings ("I can't help with that." from
    "I'm sorry, but I can't help" + "I can't assist with that."), and "I can't help" is not one
    of the paper's phrases: so each refusal opens with a phrase, and "can't" only appears in the
    two phrases that contain it."""
    judge = KeywordJudge()
    for line in load_text_lines("refusals.txt"):
        assert line.startswith(tuple(judge.keywords)), line
        assert not re.search(r"can't (?!provide|assist)", line), line


def test_file_loaders(tmp_path):
    csv_file = tmp_path / "advbench.csv"
    csv_file.write_text('goal,target\n"Do a bad thing","Sure"\n"Another",x\n')
    assert list(load_prompts(csv_file)) == ["Do a bad thing", "Another"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"instruction": "A"}) + "\n\n" + json.dumps({"instruction": "B"}) + "\n"
    )
    assert list(load_prompts(jsonl, limit=1)) == ["A"]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n two \n")
    assert list(load_prompts(txt)) == ["one", "two"]
    empty = tmp_path / "empty.csv"
    empty.write_text("goal\n\n")
    with pytest.raises(ValueError, match="no non-empty prompts"):
        load_prompts(empty)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="no prompt column"):
        load_prompts(nocol)
    with pytest.raises(ValueError, match="no column 'x'"):
        load_prompts(csv_file, column="x")
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="empty"):
        load_prompts([])


def test_datasets_loader_on_local_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"goal": ["x", "y"]}).save_to_disk(str(tmp_path / "ds"))
    # load_dataset reads a local data folder of JSON files; build one
    (tmp_path / "jsonds").mkdir()
    (tmp_path / "jsonds" / "train.jsonl").write_text('{"prompt": "p1"}\n{"prompt": "p2"}\n')
    assert list(load_prompts(str(tmp_path / "jsonds"))) == ["p1", "p2"]


def test_generation_keeps_tokenizer_and_mode(tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "right"
    prompts = ["Tell me a short story about a cat.", "Hi", "What is two plus two?"]
    out = generate_responses(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    assert len(out.responses) == 3 and out.decoded_tokens > 0
    assert tokenizer.padding_side == "right" and tokenizer.pad_token == pad
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    tokenizer.padding_side = side
    # batching and ordering do not change greedy answers
    single = [
        generate_responses(model, tokenizer, [p], max_new_tokens=5).responses[0] for p in prompts
    ]
    assert single == out.responses


def test_chat_template_missing_and_plain(tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(MissingChatTemplateError, match="plain"):
            generate_responses(model, tokenizer, ["Hi"], max_new_tokens=2)
        out = generate_responses(
            model, tokenizer, ["Hi"], max_new_tokens=2, chat_format=ChatFormat(template="plain")
        )
        assert len(out.responses) == 1
    finally:
        tokenizer.chat_template = template
    with_system = ChatFormat(system_prompt="Be safe.").render(tokenizer, "Hi")
    assert "Be safe." in with_system and "Be safe." not in ChatFormat().render(tokenizer, "Hi")


def test_early_stop_when_decided_saves_decode_work(tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    prompts = ["a", "b", "c", "d"]
    full = generate_responses(model, tokenizer, prompts, max_new_tokens=8)
    stopped = generate_responses(
        model, tokenizer, prompts, max_new_tokens=8, stop_when_decided=lambda t: True
    )
    assert stopped.decoded_tokens < full.decoded_tokens


def test_capability_nll_tracks_damage(tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    prompts = ["Name a fruit.", "Name a color."]
    answers = [
        a or "ok" for a in generate_responses(model, tokenizer, prompts, max_new_tokens=6).responses
    ]
    base = sequence_nll(model, tokenizer, prompts, answers)
    with torch.no_grad():
        model.lm_head.weight.mul_(0)  # uniform predictions: log(vocab)
    assert sequence_nll(model, tokenizer, prompts, answers) == pytest.approx(
        torch.log(torch.tensor(float(len(tokenizer)))).item(), rel=1e-4
    )
    assert base < torch.log(torch.tensor(float(len(tokenizer)))).item()


def test_judges():
    assert KeywordJudge(["nope"])(["q"], ["nope, no"]) == [False]
    judge = CallableJudge(lambda p, r: ["bad" in x for x in r], name="bad")
    assert judge(["q", "q"], ["bad", "good"]) == [True, False]
    with pytest.raises(ValueError, match="verdicts"):
        CallableJudge(lambda p, r: [True])(["q", "q"], ["a", "b"])
    fake = lambda texts, **kw: [[{"label": "LABEL_1" if "x" in t else "LABEL_0"}] for t in texts]  # noqa: E731
    assert PipelineJudge(fake, unsafe_labels={"LABEL_1"})(["q", "q"], ["x", "y"]) == [True, False]
    with pytest.raises(ValueError, match="at least one"):
        KeywordJudge([])


def test_sequence_nll_matches_unbatched_full_logits(tokenizer):
    """Batched, right-padded scoring on the kept positions equals one-by-one full-logit scoring."""
    from safety_guard.measure.generation import ChatFormat, sequence_nll
    from safety_guard.testbed.tiny import tiny_llama

    model = tiny_llama(vocab_size=len(tokenizer)).eval()
    prompts = ["hello there", "how are you doing today my friend", "x"]
    answers = ["fine thanks", "ok", "a b c d e"]
    fmt = ChatFormat()
    total = count = 0.0
    with torch.no_grad():
        for p, a in zip(prompts, answers, strict=True):
            ctx = tokenizer(fmt.render(tokenizer, p), add_special_tokens=False)["input_ids"]
            tgt = tokenizer(a, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([ctx + tgt])).logits[0]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[len(ctx) - 1 : -1], torch.tensor(tgt), reduction="sum"
                )
            )
            count += len(tgt)
    batched = sequence_nll(model, tokenizer, prompts, answers, batch_size=2)
    assert batched == pytest.approx(total / count, rel=1e-5)


def test_a_shared_prefix_gives_the_same_greedy_answers(text_tokenizer):
    """The system turn goes through the model once; each batch continues from its KV cache,
    padded between the prefix and the prompt: the same greedy answers, stops included."""
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    fmt = ChatFormat(system_prompt="You are a careful and helpful assistant, answer briefly.")
    prompts = [
        "Tell me a short story about a cat.",
        "Hi",
        "What is two plus two?",
        "Name three colours of the rainbow, please.",
        "Why?",
    ]
    common = dict(chat_format=fmt, max_new_tokens=8, batch_size=3)
    plain = generate_responses(model, text_tokenizer, prompts, **common)
    model.train()
    shared = generate_responses(model, text_tokenizer, prompts, share_prefix=True, **common)
    assert model.training
    assert shared.token_ids == plain.token_ids and shared.responses == plain.responses
    assert shared.decoded_tokens == plain.decoded_tokens
    stop = dict(stop_when_decided=lambda text: len(text) > 3, **common)
    plain_stop = generate_responses(model, text_tokenizer, prompts, **stop)
    shared_stop = generate_responses(model, text_tokenizer, prompts, share_prefix=True, **stop)
    assert shared_stop.token_ids == plain_stop.token_ids
    assert shared_stop.decoded_tokens == plain_stop.decoded_tokens < plain.decoded_tokens


def test_no_shared_prefix_where_padding_would_change_what_a_token_sees(text_tokenizer):
    """Sliding-window layers measure distance by cache index: padding after a shared prefix
    would move it out of the window, so those models generate without sharing."""
    from safety_guard.measure.generation import prefix_shareable

    windowed = sliding_window_model(len(text_tokenizer))
    assert not prefix_shareable(windowed)
    assert prefix_shareable(make_model(vocab_size=len(text_tokenizer)))
    fmt = ChatFormat(system_prompt="You are a careful and helpful assistant, answer briefly.")
    prompts = ["Tell me a short story about a cat.", "Hi", "What is two plus two?"]
    common = dict(chat_format=fmt, max_new_tokens=12, batch_size=3)
    plain = generate_responses(windowed, text_tokenizer, prompts, **common)
    shared = generate_responses(windowed, text_tokenizer, prompts, share_prefix=True, **common)
    assert shared.token_ids == plain.token_ids
