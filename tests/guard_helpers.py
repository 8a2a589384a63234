"""Helpers for guard tests: a hand-made landscape for a tiny model and a tiny SFT dataset."""

from __future__ import annotations

import contextlib
import logging

import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, get_scheduler

from safety_guard.landscape import Landscape, LandscapeConfig
from safety_guard.models.fingerprint import model_fingerprint


def make_landscape(
    model, origin_asr: float = 0.0, origin_nll: float = 5.0, radius: float = 0.1
) -> Landscape:
    """A landscape file for ``model`` with one random direction whose basin is ±radius."""
    config = LandscapeConfig(num_directions=1, alphas=(-0.2, -0.1, 0.0, 0.1, 0.2), search="grid")
    land = Landscape.new(
        config,
        {"synthetic": True},
        model_fingerprint(model),
        "tiny",
        "float32",
        config.direction_specs(),
    )
    point = {
        "asr": origin_asr,
        "unsafe": 0,
        "total": 10,
        "nll": origin_nll,
        "decoded_tokens": 0,
        "seconds": 0.0,
        "samples": [],
    }
    land.data["origin"] = point
    for alpha, asr in [
        (-0.2, 100.0),
        (-0.1, origin_asr),
        (0.0, origin_asr),
        (0.1, origin_asr),
        (0.2, 100.0),
    ]:
        land.data["directions"][0]["points"].append({**point, "alpha": alpha, "asr": asr})
    land.data["complete"] = True
    land.summarize()
    assert abs(land.basin_radius()["mean"] - 1.5 * radius) < 1e-9
    return land


#: A guard small enough for tiny models: 8 probe prompts, 6-token openings, every decision at
#: z = 0, capability off in effect (a random tiny model's NLL is not the point of these tests).
TINY_GUARD = dict(
    harmful="builtin:harmful:probe",
    num_prompts=8,
    num_benign=2,
    max_new_tokens=6,
    keep_last_safe=False,
    confidence_z=0.0,
    nll_tolerance=1e9,
)


def make_trainer(model, tokenizer, tmp_path, callbacks, steps=6, lr=1e-2, **kw) -> Trainer:
    """A CPU ``Trainer`` of ``model`` on :func:`tiny_dataset` (constant lr, seed 0), output in
    ``tmp_path/out``; ``callbacks`` is one callback or a list; ``kw`` overrides TrainingArguments."""
    options = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    args = TrainingArguments(**{**options, **kw})
    return Trainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(tokenizer),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer),
        callbacks=list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks],
    )


def tiny_dataset(tokenizer, n: int = 16) -> Dataset:
    texts = [f"question {i} answer {i % 3}" for i in range(n)]
    enc = [tokenizer(t)["input_ids"][:16] for t in texts]
    return Dataset.from_dict({"input_ids": enc, "labels": enc})


def echo_judge(model, tokenizer, prompts, tokens: int = 3):
    """A keyword judge for which ``model``'s own greedy answers to ``prompts`` are refusals.

    Its "refusal phrases" are the decoded first ``tokens`` tokens of each answer (those of at
    least 3 characters), so the aligned tiny model refuses and a finetune that changes the
    answers' openings makes it "comply": the guard sees real behaviour change on a model built
    from a config.
    """
    from safety_guard.measure.generation import generate_responses
    from safety_guard.measure.judges import KeywordJudge

    gen = generate_responses(model, tokenizer, list(prompts), max_new_tokens=tokens)
    phrases = {tokenizer.decode(ids[:tokens], skip_special_tokens=True) for ids in gen.token_ids}
    phrases = sorted(p for p in phrases if len(p.strip()) >= 3)
    if not phrases:
        raise ValueError("The tiny model's answers are too short to make refusal phrases of.")
    return KeywordJudge(phrases)


@contextlib.contextmanager
def says(caplog, text: str):
    """The block makes the guard log ``text`` at WARNING (a halt is a log line: no warning
    filter can hide it), exactly once."""
    with caplog.at_level(logging.WARNING, logger="safety_guard"):
        yield
    said = [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]


def train_loop(model, tokenizer, guard, steps, poison_at=None, lr=1e-3):
    """Train ``model`` on the tiny dataset with AdamW and a linear decay, asking ``guard``
    after every step; at ``poison_at`` one trainable weight turns NaN after the update.
    Returns the decisions."""
    data = tiny_dataset(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = get_scheduler("linear", optimizer, 0, steps)
    guard.begin(max_steps=steps, lr_schedule=scheduler)
    decisions = []
    model.train()
    for step in range(1, steps + 1):
        rows = data[(4 * step) % 16 : (4 * step) % 16 + 4]
        width = max(len(ids) for ids in rows["input_ids"])
        ids = torch.tensor([x + [0] * (width - len(x)) for x in rows["input_ids"]])
        labels = torch.tensor([x + [-100] * (width - len(x)) for x in rows["labels"]])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step == poison_at:
            with torch.no_grad():
                params[-1].view(-1)[0] = float("nan")
        decisions.append(guard.step(step, loss=loss.item()))
        if decisions[-1].halt:
            break
    return decisions
