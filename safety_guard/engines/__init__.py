"""Distributed engines: the collectives every rank takes part in (:mod:`.collectives`) and the
shards of FSDP2, FSDP (1) and DeepSpeed ZeRO-3 read and moved in place (:mod:`.shards`).

Example:
    >>> from safety_guard.engines.collectives import rank_and_world
    >>> rank_and_world()  # one process
    (0, 1)
"""
