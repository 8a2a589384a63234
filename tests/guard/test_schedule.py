"""The horizon counts what the run's learning-rate schedule has left, not the steps."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_model
from guard_helpers import TINY_GUARD, echo_judge, make_landscape, make_trainer
from transformers import get_scheduler

from safety_guard.guard import GuardConfig, LrSchedule, SafetyGuardCallback, horizon
from safety_guard.measure.prompts import load_prompts


def _stepped(name: str, steps: int, warmup: int) -> list[float]:
    """The multipliers a real optimizer sees, by stepping the scheduler as the Trainer does."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=steps)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "constant_with_warmup"])
def test_the_schedule_read_ahead_is_the_one_the_optimizer_steps_through(name):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=50)
    read = LrSchedule.from_scheduler(scheduler, 50)
    assert read.multipliers == pytest.approx(_stepped(name, 50, 5), abs=1e-12)
    # reading ahead does not step it: the warmup still starts from 0
    assert opt.param_groups[0]["lr"] == (2.0 if name == "constant" else 0.0)


def test_a_scheduler_that_cannot_be_read_ahead_counts_steps():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    assert LrSchedule.from_scheduler(plateau, 10) is None
    # MultiplicativeLR has lr_lambdas too, but they are factors of the previous step's
    decay = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda _: 0.95)
    assert LrSchedule.from_scheduler(decay, 10) is None
    assert LrSchedule.from_scheduler(None, 10) is None
    with pytest.raises(ValueError, match="non-negative"):
        LrSchedule([1.0, float("nan")])


def test_a_constant_learning_rate_gives_the_step_counted_horizon():
    cfg = GuardConfig()
    constant = LrSchedule.constant(200)
    for step, disp, growth in itertools.product((1, 10, 114, 158, 199), (1e-4, 0.01), (0, 1e-4)):
        left = 200 - step
        assert horizon(left, cfg, step, disp, growth, constant) == pytest.approx(
            horizon(left, cfg, step, disp, growth)
        )


def test_with_decay_the_horizon_is_where_the_remaining_learning_rate_can_reach():
    cfg = GuardConfig()
    linear = LrSchedule(_stepped("linear", 200, 0))
    # step 114 of 200: by steps the run could still double δ (horizon 2); by learning rate the
    # remaining steps hold 18.7 against 81.8 spent
    assert horizon(86, cfg, 114, 0.01) == 2.0
    assert horizon(86, cfg, 114, 0.01, schedule=linear) == pytest.approx(
        1 + 1.5 * linear.left(114) / linear.spent(114)
    )
    assert horizon(86, cfg, 114, 0.01, schedule=linear) < 1.4
    # early in the run the horizon stays the largest lookahead
    assert horizon(190, cfg, 10, 0.01, schedule=linear) == 2.0
    # a recent growth per unit of the (decayed) learning rate counts as today's pace
    fast = horizon(86, cfg, 114, 0.01, growth=0.01 / 50, schedule=linear)
    assert fast == pytest.approx(
        min(2.0, 1 + 1.5 * linear.left(114) * (0.01 / 50 / linear.at(114)) / 0.01)
    )
    # a warmup from 0 has spent nothing at its first step: no rate to project, the largest
    warm = LrSchedule(_stepped("cosine", 200, 20))
    assert warm.spent(1) == 0.0 and horizon(199, cfg, 1, 1e-5, schedule=warm) == 2.0


def test_the_guard_reads_the_trainers_schedule(tmp_path, text_tokenizer):
    model = make_model(vocab_size=len(text_tokenizer), tie=False)
    judge = echo_judge(model, text_tokenizer, list(load_prompts("builtin:harmful:probe", limit=8)))
    guard = SafetyGuardCallback(make_landscape(model), judge=judge, **TINY_GUARD, max_asr_rise=50)
    trainer = make_trainer(
        model, text_tokenizer, tmp_path, [guard], steps=4, lr=1e-7, lr_scheduler_type="linear"
    )
    trainer.train()
    assert guard.guard.schedule.multipliers == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert guard.summary()["horizon_counts"] == "learning rate"
