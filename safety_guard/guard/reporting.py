"""How the guard's ``safety/*`` metrics reach the user's loggers without touching the Trainer's.

The Trainer logs ``loss``, ``grad_norm`` and ``learning_rate`` at its ``logging_steps``: at the end
of a step it builds one entry, appends it to ``state.log_history`` and hands it to every
callback's ``on_log`` (W&B, TensorBoard, the progress bar, ...). ``Trainer.log`` is not the way
for a callback to add its own entries: ``CallbackHandler.on_log`` clears ``control.should_log``,
which the Trainer reads right after the step's callbacks to decide whether to log the loss, and
subclasses such as TRL's ``SFTTrainer`` fold their accumulated metrics into whatever ``log``
receives. So the guard hands its entry to the same callbacks itself
(:func:`deliver`), leaves ``control.should_log`` as it found it and appends the entry to
``state.log_history``: the Trainer's own entries are exactly those it writes without the guard.

The handler is the one that calls the guard's ``on_train_begin`` (:func:`calling_handler`), for
``Trainer(callbacks=[guard])`` as for ``SafetyGuardCallback.attach(trainer)``: the one-line
wiring reaches the loggers too. The guard's entries are entries of their own, as evaluation
entries are: loggers that place an entry by ``state.global_step`` (TensorBoard, W&B's
``train/global_step`` axis, MLflow) show them at the step they describe; a logger that numbers
its own steps by calls (DVCLive) counts each guard entry as a step.

Example:
    >>> from transformers import TrainerControl, TrainerState, TrainingArguments
    >>> from transformers.trainer_callback import CallbackHandler, TrainerCallback
    >>> class Recorder(TrainerCallback):
    ...     def __init__(self):
    ...         self.seen = []
    ...     def on_log(self, args, state, control, logs=None, **kwargs):
    ...         self.seen.append(dict(logs))
    >>> recorder = Recorder()
    >>> handler = CallbackHandler([recorder], None, None, None, None)
    >>> state, control = TrainerState(global_step=3), TrainerControl(should_log=True)
    >>> deliver(handler, None, state, control, {"safety/displacement": 0.01})
    >>> recorder.seen, control.should_log, state.log_history
    ([{'safety/displacement': 0.01}], True, [{'safety/displacement': 0.01, 'step': 3}])
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

__all__ = ["calling_handler", "deliver"]

_MAX_FRAMES = 16


def calling_handler(callback: object) -> CallbackHandler | None:
    """The ``CallbackHandler`` that is calling ``callback`` now (from one of its hooks), if any.

    transformers passes a callback neither the trainer nor its handler; the handler's
    ``call_event`` is on the stack of every hook it calls, so the nearest frame whose ``self`` is
    a handler holding ``callback`` is it.
    """
    frame = inspect.currentframe()
    try:
        for _ in range(_MAX_FRAMES):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and any(c is callback for c in owner.callbacks):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def deliver(
    handler: CallbackHandler | None,
    args: Any,
    state: TrainerState,
    control: TrainerControl,
    metrics: dict[str, float],
) -> None:
    """Log ``metrics`` as an entry of its own: into ``state.log_history`` (with ``step``) and
    through every callback's ``on_log`` (the user's loggers), leaving ``control.should_log``
    (the Trainer's decision to log this step's loss) as it was."""
    state.log_history.append({**metrics, "step": state.global_step})
    if handler is None:
        return
    should_log = control.should_log
    try:
        handler.on_log(args, state, control, logs=dict(metrics))
    finally:
        control.should_log = should_log
