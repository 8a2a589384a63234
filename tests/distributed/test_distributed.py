"""Two CPU processes under torchrun (gloo): DDP, FSDP2 and DeepSpeed ZeRO-3 guards take the same
decisions on every rank, a two-rank landscape equals the one-process landscape; rank 0 writes
files. The ZeRO-3 cases need ``deepspeed`` (the ``deepspeed`` extra) and run it on CPU
(``DS_ACCELERATOR=cpu``, set by the scripts)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
_ZERO3 = pytest.mark.skipif(not _DEEPSPEED, reason="DeepSpeed is not installed")


def _torchrun(port: int, *argv: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2`` of a script (or ``-m module``) on CPU threads of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "--master_port", str(port), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _one_process(*argv: str) -> subprocess.CompletedProcess:
    """``python -m safety_guard ...`` in one process, on CPU threads of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "safety_guard", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _assert_same_points(one: list, other: list, keys: tuple) -> None:
    """The same points (``keys`` equal, NLL within 1e-4)."""
    assert len(one) == len(other)
    for a, b in zip(one, other, strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
        assert abs(a["nll"] - b["nll"]) < 1e-4


@pytest.mark.parametrize("mode", ["deadlines", "split"])
def test_ranks_agree_on_the_most_severe_decision_and_the_earliest_deadline(tmp_path, mode):
    """A halt deferred by ``halt_within`` (a warning with a deadline): ranks whose deadlines
    differ take the earliest; a rank that halts makes every rank halt."""
    script = Path(__file__).with_name("dist_agree_script.py")
    port = {"deadlines": 29541, "split": 29542}[mode]
    proc = _torchrun(port, str(script), str(tmp_path), mode)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["status"] == ranks[1]["status"] == (1 if mode == "deadlines" else 2)
    assert ranks[0]["deadline"] == ranks[1]["deadline"] == (50 if mode == "deadlines" else None)
    assert "another rank decided so" in ranks[0]["reasons"][-1]


@pytest.mark.parametrize("landscape", ["given", "computed", pytest.param("zero3", marks=_ZERO3)])
def test_every_rank_takes_the_same_halt_decision(tmp_path, text_tokenizer, landscape):
    """With a landscape file, or none (all ranks compute it together at train begin), or under
    ``Trainer``'s DeepSpeed ZeRO-3 integration (the guard on the partitions)."""
    text_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    out.mkdir()
    script = Path(__file__).with_name("dist_guard_script.py")
    proc = _torchrun(29517, str(script), str(out), str(tmp_path / "tok"), landscape)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert all(r["sharded"] == (landscape == "zero3") for r in ranks)
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


_PORTS = {
    "full": 29518,
    "lora": 29521,
    "zero3": 29526,
    "zero3-lora": 29527,
    "fsdp1": 29531,
    "fsdp1-lora": 29532,
    "fsdp1-noshard": 29534,
}


@pytest.mark.parametrize(
    "mode",
    [
        "full",
        "lora",
        "fsdp1",
        "fsdp1-lora",
        "fsdp1-noshard",
        pytest.param("zero3", marks=_ZERO3),
        pytest.param("zero3-lora", marks=_ZERO3),
    ],
)
def test_sharded_guard_reads_the_same_numbers_as_the_whole_model(tmp_path, text_tokenizer, mode):
    """FSDP2 (fully_shard), FSDP (1) or DeepSpeed ZeRO-3 on 2 CPU ranks, full finetuning or a LoRA
    adapter: the guard on the shards equals the guard on the whole model (same finetune),
    restores its shards bit for bit, and both ranks decide the same."""
    text_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    out.mkdir()
    script = Path(__file__).with_name("dist_fsdp_script.py")
    proc = _torchrun(_PORTS[mode], str(script), str(out), str(tmp_path / "tok"), mode)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # FSDP's NO_SHARD (what it picks on one rank) keeps whole tensors: read as DDP, prompts split
    sharded = mode != "fsdp1-noshard"
    for r in ranks:
        assert r["sharded"] == sharded and r["fingerprint_problems"] == []
        assert r["plain_check"] == ("refused" if sharded else "accepted"), r["plain_check"]
        # every rank scores every prompt on the shards (forwards are collectives under FSDP2)
        assert r["split_prompts"] == {"ref": True, "fsdp": not sharded}
        if sharded and not mode.endswith("lora"):
            # θ₀ kept for the rank's shard only: about half of the whole model's
            assert r["origin_bytes"]["fsdp"] < 0.6 * r["origin_bytes"]["ref"]
        for c in r["checks"]:
            assert c["restored"], c  # the probes left every shard as it was, bit for bit
            ref, fsdp = c["displacement"]["ref"], c["displacement"]["fsdp"]
            assert ref > 0 and abs(ref - fsdp) <= 1e-6 * ref, c
            assert c["sketch_diff"] < 1e-9, c
            assert c["lookahead_logits_diff"] < 1e-4, c
        # the same probes, statuses and rises on the shards as on the whole model
        ref_d, fsdp_d = r["decisions"]["ref"], r["decisions"]["fsdp"]
        assert [d[:3] for d in ref_d] == [d[:3] for d in fsdp_d]
        for a, b in zip(ref_d, fsdp_d, strict=True):
            for x, y in zip(a[3:], b[3:], strict=True):
                assert (x is None and y is None) or abs(x - y) < 1e-6, (a, b)
        assert any(d[1] == "probe" for d in fsdp_d)
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    for r in ranks:  # a real training step after the probes: the whole model's loss and update
        if not mode.startswith("zero3"):
            loss_ref, loss_fsdp = r["train_step"]["loss"]
            assert abs(loss_ref - loss_fsdp) < 1e-5 and r["train_step"]["weights_diff"] < 1e-6, r
    if not mode.endswith("lora"):
        for r in ranks:  # a random landscape direction moves each shard by its range of it
            moved = r["random_direction"]
            assert moved["slice_diff"] < 1e-6 and moved["logits_diff"] < 1e-4, moved
            assert moved["restored"], moved
            if mode == "fsdp1":  # tied embeddings: read once, moved once, as on the whole model
                tied = r["tied"]
                assert tied["names_equal"] and tied["fingerprint_problems"] == [], tied
                moved = tied["random_direction"]
                assert moved["slice_diff"] < 1e-6 and moved["logits_diff"] < 1e-4, moved
                assert moved["restored"], moved
        return
    # LoRA: the sharded adapter ends equal to the whole one (restored alike on a halt), and the
    # last safe adapter, gathered and written by the main process, equals the whole model's
    for r in ranks:
        assert r["final_adapter_diff"] < 1e-6, r["final_adapter_diff"]
        assert r["fp32_copy_diff"] == 0.0, r["fp32_copy_diff"]  # ZeRO-3's copy: restored too
    saved = ranks[0]["last_safe"]
    assert saved["steps"][0] == saved["steps"][1] and saved["same_keys"] and saved["config"]
    assert saved["diff"] < 1e-6, saved
    # it halted, and restore_on_halt loaded each rank's shard of the last safe adapter back
    assert ranks[0]["decisions"]["fsdp"][-1][2] == "halt"
    assert saved["steps"][0] < ranks[0]["decisions"]["fsdp"][-1][0]
    assert saved["model_vs_saved"] == 0.0, saved


@pytest.mark.parametrize(
    "mode", ["computed", "fsdp1-computed", pytest.param("zero3-computed", marks=_ZERO3)]
)
def test_a_sharded_guard_without_a_landscape_computes_it_with_every_rank(
    tmp_path, text_tokenizer, mode
):
    """landscape=None on FSDP2 or FSDP shards or ZeRO-3 partitions: the ranks compute it together at
    train begin (each moves its shards, every prompt in lockstep), the same landscape as the
    guard on the whole model; the main process writes it."""
    text_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    out.mkdir()
    script = Path(__file__).with_name("dist_fsdp_script.py")
    port = {"computed": 29522, "zero3-computed": 29525, "fsdp1-computed": 29533}[mode]
    proc = _torchrun(port, str(script), str(out), str(tmp_path / "tok"), mode)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    keys = ("alpha", "asr", "unsafe", "total", "flagged_prompts")
    for r in ranks:
        assert r["restored"], "the landscape left the shards moved"
        ref, fsdp = r["landscapes"]["ref"], r["landscapes"]["fsdp"]
        assert len(fsdp) == len(ref) == 2  # GuardConfig.landscape_directions
        for d_ref, d_fsdp in zip(ref, fsdp, strict=True):
            assert len(d_fsdp["points"]) == len(d_ref["points"]) >= 3
            for a, b in zip(d_ref["points"], d_fsdp["points"], strict=True):
                assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
                assert abs(a["nll"] - b["nll"]) < 1e-4
    written = json.loads((out / "fsdp" / "landscape.json").read_text())["directions"]
    for r in ranks:  # every rank holds the points the main process wrote (timings aside)
        for d_written, d_rank in zip(written, r["landscapes"]["fsdp"], strict=True):
            for a, b in zip(d_written["points"], d_rank["points"], strict=True):
                assert {k: a.get(k) for k in (*keys, "nll")} == {
                    k: b.get(k) for k in (*keys, "nll")
                }
    assert not (out / "ref1" / "landscape.json").exists()  # only the main process writes


def test_a_two_rank_landscape_equals_the_one_process_landscape(tmp_path, text_tokenizer):
    """`safety-guard landscape` under torchrun: each rank answers its share of the prompts, the
    main process writes the file, and the file holds the same points as one process computes."""
    from conftest import make_model

    from safety_guard.models.fingerprint import compare_fingerprints

    folder = tmp_path / "tiny"
    make_model(vocab_size=len(text_tokenizer), tie=False).save_pretrained(folder)
    text_tokenizer.save_pretrained(folder)
    options = [
        "landscape",
        str(folder),
        "--num-directions",
        "1",
        "--grid=-0.2,-0.1,0,0.1,0.2",
        "--search",
        "grid",
        "--num-prompts",
        "9",
        "--num-benign",
        "3",
        "--max-new-tokens",
        "6",
        "--quiet",
    ]
    one = _one_process(*options, "--output", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(29519, "-m", "safety_guard", *options, "--output", str(tmp_path / "two.json"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved ") == 1  # the main process reports and writes
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    keys = ("alpha", "asr", "unsafe", "total", "unsafe_prompts", "flagged_prompts")
    points_a = [{k: p.get(k) for k in keys} for p in a["directions"][0]["points"]]
    points_b = [{k: p.get(k) for k in keys} for p in b["directions"][0]["points"]]
    assert points_a == points_b and len(points_a) == 5
    for pa, pb in zip(a["directions"][0]["points"], b["directions"][0]["points"], strict=True):
        assert abs(pa["nll"] - pb["nll"]) < 1e-4
    # (decoded tokens depend on how prompts are batched: a batch decodes until all are decided)
    a["summary"].pop("decoded_tokens"), b["summary"].pop("decoded_tokens")
    assert a["summary"] == b["summary"]
    # the guard's baseline of the aligned model, measured across the ranks, is the same too
    assert a["guard_baseline"]["token_ids"] == b["guard_baseline"]["token_ids"]
    assert a["guard_baseline"]["unsafe"] == b["guard_baseline"]["unsafe"]
    # FSDP2 (--shard): each rank moves its own shards along its range of the same directions
    # and answers every prompt in lockstep; the same points again
    sharded = _torchrun(
        29520, "-m", "safety_guard", *options, "--shard", "--output", str(tmp_path / "fsdp.json")
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    c = json.loads((tmp_path / "fsdp.json").read_text())
    # shards generate every prompt in lockstep (no screen first), so they record the screen
    # at every point where one process switched to generating: the verdicts are the same
    verdicts = ("alpha", "asr", "unsafe", "total", "unsafe_prompts")
    points_c = [{k: p.get(k) for k in verdicts} for p in c["directions"][0]["points"]]
    assert points_c == [{k: p.get(k) for k in verdicts} for p in a["directions"][0]["points"]]
    assert all(p["signal"] == "generate" for p in c["directions"][0]["points"])
    for pa, pc in zip(a["directions"][0]["points"], c["directions"][0]["points"], strict=True):
        assert abs(pa["nll"] - pc["nll"]) < 1e-4
    # the file made on shards is the file of the same model (it can guard a 1-GPU finetune)
    assert compare_fingerprints(a["model"]["fingerprint"], c["model"]["fingerprint"]) == []
    assert "guard_baseline" not in c  # on shards the guard measures its own, in lockstep
    # a 2D surface (two orthogonalized random directions) on shards: the same surface too
    surface = [o for o in options if not o.startswith("--grid")]
    surface[surface.index("--num-directions") + 1] = "2"
    surface += ["--dims", "2", "--grid=-0.1,0,0.1"]
    flat = _one_process(*surface, "--output", str(tmp_path / "one2d.json"))
    assert flat.returncode == 0, flat.stderr[-3000:]
    sharded2d = _torchrun(
        29523, "-m", "safety_guard", *surface, "--shard", "--output", str(tmp_path / "fsdp2d.json")
    )
    assert sharded2d.returncode == 0, sharded2d.stderr[-3000:]
    d = json.loads((tmp_path / "one2d.json").read_text())["surface"]["points"]
    e = json.loads((tmp_path / "fsdp2d.json").read_text())["surface"]["points"]
    assert len(d) == 9
    keys2 = ("alpha", "beta", *verdicts[1:])
    _assert_same_points(d, e, keys2)
    # an interpolation landscape towards a finetuned model saved as a sharded checkpoint: each
    # rank reads its range of each target tensor
    target = make_model(vocab_size=len(text_tokenizer), tie=False, seed=1)
    target.save_pretrained(tmp_path / "target", max_shard_size="40KB")
    assert len(list((tmp_path / "target").glob("*.safetensors"))) > 1
    line = [o for o in options if not o.startswith("--grid")]
    line += ["--direction", "interpolation", "--target", str(tmp_path / "target")]
    line += ["--grid=0,0.5,1"]
    one_line = _one_process(*line, "--output", str(tmp_path / "one_i.json"))
    assert one_line.returncode == 0, one_line.stderr[-3000:]
    sharded_line = _torchrun(
        29524, "-m", "safety_guard", *line, "--shard", "--output", str(tmp_path / "fsdp_i.json")
    )
    assert sharded_line.returncode == 0, sharded_line.stderr[-3000:]
    f = json.loads((tmp_path / "one_i.json").read_text())["directions"][0]["points"]
    g = json.loads((tmp_path / "fsdp_i.json").read_text())["directions"][0]["points"]
    assert len(f) == 3
    _assert_same_points(f, g, verdicts)
    # a 2D surface with an interpolation axis (the finetuning direction × a random direction,
    # orthogonalized from dot products summed over the shards): the same surface as one process
    plane = [o for o in line if not o.startswith("--grid")] + ["--dims", "2", "--grid=0,0.5"]
    one_plane = _one_process(*plane, "--output", str(tmp_path / "one_p.json"))
    assert one_plane.returncode == 0, one_plane.stderr[-3000:]
    sharded_plane = _torchrun(
        29528, "-m", "safety_guard", *plane, "--shard", "--output", str(tmp_path / "fsdp_p.json")
    )
    assert sharded_plane.returncode == 0, sharded_plane.stderr[-3000:]
    h = json.loads((tmp_path / "one_p.json").read_text())["surface"]["points"]
    k = json.loads((tmp_path / "fsdp_p.json").read_text())["surface"]["points"]
    assert len(h) == 4
    _assert_same_points(h, k, keys2)
