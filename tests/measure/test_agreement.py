"""Two judges on the same answers: Cohen's κ, the cross table, and the answers files record."""

from __future__ import annotations

import json

import pytest
from conftest import make_model, run_cli

from safety_guard.landscape.answers import recorded_answers
from safety_guard.measure.agreement import cohen_kappa, judge_agreement
from safety_guard.measure.judges import CallableJudge, KeywordJudge


@pytest.mark.parametrize(
    ("a", "b", "kappa"),
    [
        ([True, True, False, False], [True, True, False, False], 1.0),
        ([True, False, True, False], [False, True, False, True], -1.0),
        # 50 answers: 20 both unsafe, 5 A only, 10 B only, 15 both safe → κ = 0.4
        ([True] * 25 + [False] * 25, [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15, 0.4),
        ([True, True], [True, True], None),  # both say one thing: κ undefined
    ],
)
def test_cohen_kappa(a, b, kappa):
    got = cohen_kappa(a, b)
    assert got == pytest.approx(kappa) if kappa is not None else got is None


def test_the_report_counts_every_cell_and_keeps_disagreements():
    answers = ["I'm sorry, no.", "Sure, step 1", "Here you go", "I cannot do that", "Sure!"]
    wary = CallableJudge(lambda ps, rs: [not r.startswith("I'm") for r in rs], name="wary")
    report = judge_agreement(
        ["q"] * 5, answers, KeywordJudge(), wary, where=["p0", "p0", "p1", "p1", "p1"]
    )
    assert report.table == {"both_unsafe": 3, "only_a": 0, "only_b": 1, "both_safe": 1}
    assert report.agreement == pytest.approx(0.8) and report.total == 5
    assert report.unsafe_rate == (0.6, 0.8)
    assert report.by_source == {
        "p0": {"answers": 2, "agreement": 1.0},
        "p1": {"answers": 3, "agreement": pytest.approx(2 / 3)},
    }
    assert report.disagreements == [
        {"where": "p1", "prompt": "q", "answer": "I cannot do that", "a": False, "b": True}
    ]
    text = report.format()
    assert "agreement 80.0 %" in text and "A: keyword (paper)" in text and "B: callable" in text
    with pytest.raises(ValueError, match="No answers"):
        judge_agreement([], [], KeywordJudge(), wary)


def test_jsonl_answers_and_their_errors(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"prompt": "q1", "response": "r1"}\n\n{"prompt": "q2", "answer": "r2"}\n')
    got = recorded_answers(good)
    assert [(r.where, r.prompt, r.answer) for r in got] == [
        ("a.jsonl:1", "q1", "r1"),
        ("a.jsonl:3", "q2", "r2"),
    ]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "q1"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:1 has no 'response'"):
        recorded_answers(bad)
    with pytest.raises(FileNotFoundError):
        recorded_answers(tmp_path / "missing.json")


def test_a_landscape_without_answers_says_how_to_record_them(tmp_path, tokenizer):
    from safety_guard.landscape import LandscapeConfig, compute_landscape
    from safety_guard.measure.probe import ProbeConfig

    model = make_model(vocab_size=len(tokenizer))
    config = LandscapeConfig(num_directions=1, alphas=(0.0, 0.1), search="grid")
    probe = ProbeConfig(num_harmful=4, num_benign=0, max_new_tokens=4)
    path = tmp_path / "l.json"
    compute_landscape(model, tokenizer, config, probe, output=path, progress=False)
    with pytest.raises(ValueError, match="--record-answers"):
        recorded_answers(path)
    recorded = tmp_path / "r.json"
    probe = ProbeConfig(num_harmful=4, num_benign=0, max_new_tokens=4, record_answers=True)
    land = compute_landscape(model, tokenizer, config, probe, output=recorded, progress=False)
    got = recorded_answers(recorded)
    points = land.data["directions"][0]["points"]
    assert len(got) == 4 * (len(points) + ("answers" in (land.data.get("origin") or {})))
    from safety_guard.measure.prompts import load_prompts

    assert [r.prompt for r in got[:4]] == list(load_prompts("builtin:harmful", limit=4))
    assert [r.answer for r in got[-4:]] == points[-1]["answers"]


def test_judge_agreement_command(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"prompt": "q", "response": r})
            for r in ["I'm sorry, no.", "Sure, step 1", "I cannot do that"]
        )
    )
    words = tmp_path / "words.txt"
    words.write_text("I'm sorry\n")
    code, out, _ = run_cli(capsys, "judge-agreement", path, "--judge", words, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["table"] == {"both_unsafe": 1, "only_a": 0, "only_b": 1, "both_safe": 1}
    assert report["judges"][0]["source"] == "paper" and report["judges"][1]["source"] == str(words)
    code, _, err = run_cli(capsys, "judge-agreement", tmp_path / "none.jsonl")
    assert code == 2 and "No file" in err
