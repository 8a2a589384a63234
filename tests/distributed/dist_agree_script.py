"""Run by test_distributed.py under torchrun: 2 ranks, gloo. Rank 0 holds a halt deferred to step
55, rank 1 the same deferral to step 50, or (``split``) the halt itself; ``agree`` must give
both ranks the same decision. ``dist_agree_script.py OUT [deadlines|split]``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from safety_guard.guard import GuardConfig
from safety_guard.guard.forecast import agree, deferred
from safety_guard.guard.rule import PointEstimate, decide


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    config = GuardConfig(halt_within=10)
    points = {1.0: PointEstimate(8.0, 3.0, 1.0), 2.0: PointEstimate(25.0, 20.0, 2.0)}
    halt = decide(points, 2.0, config)
    decision = deferred(halt, points, 40, 25 if rank == 0 else 20, config)
    if mode == "split" and rank == 1:
        decision = halt
    agreed = agree(decision)
    result = {"status": agreed.status, "deadline": agreed.deadline, "reasons": agreed.reasons}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
