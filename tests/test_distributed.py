"""Two CPU processes under torchrun (gloo): both ranks halt at the same step; rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_every_rank_takes_the_same_halt_decision(tmp_path, text_tokenizer):
    text_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    out.mkdir()
    script = Path(__file__).with_name("dist_guard_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(script),
            str(out),
            str(tmp_path / "tok"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    # each rank scores half of the prompts; the per-prompt results are all-reduced, so both
    # ranks see the same numbers, take the same decisions and halt at the same step
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert ranks[0]["halt_step"] is not None
    assert ranks[0]["halt_step"] == ranks[1]["halt_step"] == ranks[0]["global_step"]
    assert ranks[1]["global_step"] == ranks[0]["global_step"]
    # rank 1 returned from train() only after rank 0 had written the summary and the plot
    assert ranks[1]["outputs_written"] and ranks[0]["outputs_written"]
    trajectory = out / "safety-guard" / "trajectory.jsonl"
    lines = [json.loads(x) for x in trajectory.read_text().splitlines()]
    halt = ranks[0]["halt_step"]
    assert len([x for x in lines if x["step"] == halt]) == 1  # written once, by the main process
