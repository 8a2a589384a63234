"""The guard's collectives: see :mod:`safety_guard.distributed`."""

from ..distributed import (
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    rank_and_world,
)

__all__ = ["all_gather_objects", "all_reduce_max", "all_reduce_sum", "barrier", "rank_and_world"]
