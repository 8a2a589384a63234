"""PipelineJudge's unsafe labels: given, or read from the classifier's id2label, never guessed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from safety_guard.measure.judges import (
    KeywordJudge,
    PipelineJudge,
    build_judge,
    unsafe_labels_from_config,
)


class FakePipeline:
    """A text-classification pipeline stand-in: label by keyword, with a model config."""

    def __init__(self, id2label: dict[int, str] | None, rule: dict[str, str]) -> None:
        config = SimpleNamespace(id2label=id2label) if id2label is not None else None
        self.model = SimpleNamespace(config=config, name_or_path="fake/classifier")
        self.rule = rule

    def __call__(self, texts, **kwargs):
        out = []
        for text in texts:
            label = next((lab for word, lab in self.rule.items() if word in text), "other")
            out.append([{"label": label, "score": 0.9}])
        return out


def test_labels_from_id2label_when_not_given() -> None:
    pipe = FakePipeline({0: "safe", 1: "unsafe"}, {"bomb": "unsafe", "cake": "safe"})
    judge = PipelineJudge(pipe)
    assert judge.unsafe_labels == {"unsafe"}
    assert judge(["q", "q"], ["a bomb", "a cake"]) == [True, False]
    assert judge.to_dict() == {
        "kind": "pipeline",
        "model": "fake/classifier",
        "unsafe_labels": ["unsafe"],
    }


def test_label_one_meaning_safe_is_not_taken_as_unsafe() -> None:
    """The old default counted LABEL_1 as unsafe: here label 1 means safe, so it must not."""
    pipe = FakePipeline({0: "LABEL_0", 1: "LABEL_1"}, {"cake": "LABEL_1", "bomb": "LABEL_0"})
    with pytest.raises(ValueError, match="clearly means unsafe"):
        PipelineJudge(pipe)
    judge = PipelineJudge(pipe, unsafe_labels=["LABEL_0"])
    assert judge(["q", "q"], ["a bomb", "a cake"]) == [True, False]


@pytest.mark.parametrize(
    ("id2label", "unsafe"),
    [
        ({0: "SAFE", 1: "UNSAFE"}, {"UNSAFE"}),
        ({0: "non-toxic", 1: "toxic", 2: "severe_toxic"}, {"toxic", "severe_toxic"}),
        ({0: "not_harmful", 1: "Harmful"}, {"Harmful"}),
        ({0: "harmless", 1: "no toxicity", 2: "toxic"}, {"toxic"}),
    ],
)
def test_unsafe_labels_from_config(id2label: dict[int, str], unsafe: set[str]) -> None:
    assert unsafe_labels_from_config(id2label) == unsafe


def test_clear_errors() -> None:
    no_config = FakePipeline(None, {})
    with pytest.raises(ValueError, match="needs unsafe_labels"):
        PipelineJudge(no_config)
    assert PipelineJudge(no_config, unsafe_labels="bad").unsafe_labels == {"bad"}
    with pytest.raises(ValueError, match="empty"):
        PipelineJudge(no_config, unsafe_labels=[])
    labelled = FakePipeline({0: "safe", 1: "unsafe"}, {})
    with pytest.raises(ValueError, match="is a label of this classifier"):
        PipelineJudge(labelled, unsafe_labels={"UNSAFE"})


def test_build_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    made: list[str] = []

    def fake_pipeline(task: str, model: str) -> FakePipeline:
        made.append(f"{task} {model}")
        return FakePipeline({0: "LABEL_0", 1: "LABEL_1"}, {})

    monkeypatch.setattr(transformers, "pipeline", fake_pipeline)
    assert isinstance(build_judge(None), KeywordJudge)
    assert isinstance(build_judge("keyword"), KeywordJudge)
    judge = build_judge("pipeline:org/model", ["LABEL_1"])
    assert made == ["text-classification org/model"] and judge.unsafe_labels == {"LABEL_1"}
    with pytest.raises(ValueError, match="clearly means unsafe"):
        build_judge("pipeline:org/model")
    with pytest.raises(ValueError, match="pipeline:MODEL judge only"):
        build_judge("keyword", ["unsafe"])
