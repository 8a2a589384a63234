"""The CPU-thread advisor of a testbed build: torch threads only on the cores others leave idle.

A build creates one :class:`ThreadAdvisor`, calls its :meth:`~ThreadAdvisor.update` between
generation batches and, through :meth:`~ThreadAdvisor.trainer_callback`, before every training
step, and restores torch's thread count at the end. Nothing is kept at module level.

Example:
    >>> advisor = ThreadAdvisor()
    >>> advisor.update() >= 1
    True
    >>> advisor.restore()
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch

from safety_guard._extras import MissingExtraError, require

__all__ = ["ThreadAdvisor"]

logger = logging.getLogger(__name__)


class ThreadAdvisor:
    """Keeps torch's CPU thread count at the number of cores other processes leave idle.

    OpenMP threads that share a core with a busy process wait for each other at every barrier:
    measured on a 2-core machine with one busy neighbour, a training step took 48 s with 2
    threads and 9 s with 1. :meth:`update` compares the machine's busy CPU time with this
    process's own since the last call and sets ``torch.set_num_threads`` to the cores that are
    at least 80 % idle (at least 1, at most the count torch started with). Inactive when
    ``OMP_NUM_THREADS`` is set, on CUDA, or without ``psutil``.
    """

    _FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")

    def __init__(self) -> None:
        self.initial = torch.get_num_threads()
        self.used: set[int] = {self.initial}
        self.active = not os.environ.get("OMP_NUM_THREADS") and not torch.cuda.is_available()
        self._psutil: Any = None
        self._last: tuple[float, float, float] | None = None
        if self.active:
            self.active = self._start()

    def _start(self) -> bool:
        """Take the first CPU-time sample; ``False`` (with a warning) when psutil cannot."""
        try:
            self._psutil = require(
                "psutil", "testbed", purpose="Adapting the testbed build's CPU threads"
            )
        except MissingExtraError as err:
            logger.warning("%s. The build keeps torch's %d threads.", err, self.initial)
            return False
        try:
            self._process = self._psutil.Process()
            self._last = self._sample()
        except (self._psutil.Error, OSError, NotImplementedError) as err:
            logger.warning(
                "psutil cannot read this machine's CPU times (%s: %s); the build keeps torch's "
                "%d threads.",
                type(err).__name__,
                err,
                self.initial,
            )
            return False
        return True

    def _sample(self) -> tuple[float, float, float]:
        times = self._psutil.cpu_times()
        busy = sum(getattr(times, name, 0.0) for name in self._FIELDS)
        own = self._process.cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def update(self, min_interval: float = 0.5) -> int:
        """Re-measure (if ``min_interval`` seconds passed) and set the thread count; return it."""
        if not self.active or self._last is None:
            return torch.get_num_threads()
        now = self._sample()
        wall = now[0] - self._last[0]
        if wall < min_interval:
            return torch.get_num_threads()
        others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
        self._last = now
        cores = os.cpu_count() or self.initial
        # a neighbour on a core costs far more than leaving that core idle: use a core only
        # when others leave at least 80 % of it free
        threads = max(1, min(self.initial, math.floor(cores - others + 0.2)))
        if threads != torch.get_num_threads():
            logger.info(
                "Other processes use %.1f of %d CPU cores: %d torch thread(s) now.",
                others,
                cores,
                threads,
            )
            torch.set_num_threads(threads)
            self.used.add(threads)
        return threads

    def restore(self) -> None:
        """Give torch back the thread count it had when this advisor was made."""
        torch.set_num_threads(self.initial)

    def trainer_callback(self) -> Any:
        """A ``TrainerCallback`` that calls :meth:`update` at the beginning of every step.

        Example:
            >>> ThreadAdvisor().trainer_callback().on_step_begin  # doctest: +ELLIPSIS
            <bound method ...>
        """
        from transformers import TrainerCallback

        advisor = self

        class _AdaptThreads(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                advisor.update()

        return _AdaptThreads()
