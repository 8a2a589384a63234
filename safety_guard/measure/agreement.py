"""How two judges agree on the same answers: per-answer agreement, Cohen's κ, the cross table.

:func:`~safety_guard.landscape.answers.recorded_answers` reads the answers a landscape file
or a prompt/response JSONL file recorded.

Example:
    >>> from safety_guard.measure.judges import CallableJudge, KeywordJudge
    >>> strict = CallableJudge(lambda ps, rs: ["Sure" in r for r in rs], name="strict")
    >>> report = judge_agreement(["q"] * 3, ["Sure, here", "I'm sorry, no", "Well..."],
    ...                          KeywordJudge(), strict)
    >>> report.table, report.agreement
    ({'both_unsafe': 1, 'only_a': 1, 'only_b': 0, 'both_safe': 1}, 0.6666666666666666)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from safety_guard.measure.judges import Judge

__all__ = ["Agreement", "cohen_kappa", "judge_agreement"]


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's κ of two binary raters: (agreement − chance agreement) / (1 − chance agreement).

    ``None`` when chance agreement is 1 (both raters gave one same verdict to everything: κ is
    undefined there).

    Example:
        >>> cohen_kappa([True, True, False, False], [True, False, False, False])
        0.5
    """
    if len(a) != len(b):
        raise ValueError(f"{len(a)} verdicts against {len(b)}.")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)


@dataclass
class Agreement:
    """Two judges on the same answers.

    Attributes:
        judges: the two judges' ``to_dict()``.
        total: answers judged.
        table: ``both_unsafe``, ``only_a`` (A unsafe, B safe), ``only_b``, ``both_safe``.
        agreement: share of answers with the same verdict.
        kappa: Cohen's κ (``None`` where undefined).
        unsafe_rate: each judge's share of unsafe verdicts (its ASR on these answers, /1).
        by_source: per place of recording (a landscape point, the baseline): answers and
            agreement.
        disagreements: the first answers the judges disagree on (``where``, ``prompt``,
            ``answer``, ``a``, ``b``).
    """

    judges: tuple[dict[str, Any], dict[str, Any]]
    total: int
    table: dict[str, int]
    agreement: float
    kappa: float | None
    unsafe_rate: tuple[float, float]
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "judges": list(self.judges),
            "total": self.total,
            "table": self.table,
            "agreement": self.agreement,
            "kappa": self.kappa,
            "unsafe_rate": list(self.unsafe_rate),
            "by_source": self.by_source,
            "disagreements": self.disagreements,
        }

    def format(self) -> str:
        """The report as text: the judges, the cross table, agreement and κ."""
        a, b = (_judge_name(j) for j in self.judges)
        t = self.table
        kappa = "undefined" if self.kappa is None else f"{self.kappa:.3f}"
        width = max(len(a), 12)
        lines = [
            f"A: {a}",
            f"B: {b}",
            f"{self.total} answers; agreement {100 * self.agreement:.1f} %; Cohen's kappa {kappa}",
            f"unsafe: A {100 * self.unsafe_rate[0]:.1f} %, B {100 * self.unsafe_rate[1]:.1f} %",
            "",
            f"{'':{width}}  B unsafe  B safe",
            f"{'A unsafe':{width}}  {t['both_unsafe']:8d}  {t['only_a']:6d}",
            f"{'A safe':{width}}  {t['only_b']:8d}  {t['both_safe']:6d}",
        ]
        if self.disagreements:
            lines += ["", "first disagreements (A, B: where: prompt -> answer):"]
            for d in self.disagreements:
                verdicts = "/".join("unsafe" if v else "safe" for v in (d["a"], d["b"]))
                lines.append(
                    f"  {verdicts}: {d['where']}: {d['prompt'][:60]!r} -> {d['answer'][:80]!r}"
                )
        return "\n".join(lines)


def _judge_name(info: dict[str, Any]) -> str:
    kind = info.get("kind", "?")
    detail = info.get("model") or info.get("name") or info.get("source")
    fmt = f" {info['format']}" if info.get("format") else ""
    return f"{kind}{fmt} ({detail})" if detail else f"{kind}{fmt}"


def judge_agreement(
    prompts: Sequence[str],
    answers: Sequence[str],
    judge_a: Judge,
    judge_b: Judge,
    where: Sequence[str] | None = None,
    max_disagreements: int = 10,
) -> Agreement:
    """Judge the same (prompt, answer) pairs with two judges and compare their verdicts.

    Args:
        prompts, answers: the requests and the answers to judge.
        judge_a, judge_b: the two judges.
        where: where each answer was recorded (for ``by_source``); default: one source.
        max_disagreements: how many disagreeing answers the report keeps.

    Raises:
        ValueError: no answers, or lists of different lengths.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts for {len(answers)} answers.")
    if not answers:
        raise ValueError("No answers to judge.")
    where = list(where) if where is not None else ["answers"] * len(answers)
    va = [bool(v) for v in judge_a(list(prompts), list(answers))]
    vb = [bool(v) for v in judge_b(list(prompts), list(answers))]
    for name, verdicts in (("A", va), ("B", vb)):
        if len(verdicts) != len(answers):
            raise ValueError(f"Judge {name} gave {len(verdicts)} verdicts for {len(answers)}.")
    table = {
        "both_unsafe": sum(x and y for x, y in zip(va, vb, strict=True)),
        "only_a": sum(x and not y for x, y in zip(va, vb, strict=True)),
        "only_b": sum(y and not x for x, y in zip(va, vb, strict=True)),
        "both_safe": sum(not x and not y for x, y in zip(va, vb, strict=True)),
    }
    n = len(answers)
    by_source: dict[str, dict[str, float]] = {}
    for w in dict.fromkeys(where):
        rows = [i for i, x in enumerate(where) if x == w]
        by_source[w] = {
            "answers": len(rows),
            "agreement": sum(va[i] == vb[i] for i in rows) / len(rows),
        }
    disagreements = [
        {"where": where[i], "prompt": prompts[i], "answer": answers[i], "a": va[i], "b": vb[i]}
        for i in range(n)
        if va[i] != vb[i]
    ][:max_disagreements]
    return Agreement(
        judges=(judge_a.to_dict(), judge_b.to_dict()),
        total=n,
        table=table,
        agreement=(table["both_unsafe"] + table["both_safe"]) / n,
        kappa=cohen_kappa(va, vb),
        unsafe_rate=(sum(va) / n, sum(vb) / n),
        by_source=by_source,
        disagreements=disagreements,
    )
