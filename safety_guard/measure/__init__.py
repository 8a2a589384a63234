"""Measuring a model's safety: the prompts (:mod:`.prompts`), generation (:mod:`.generation`),
the judges of answers (:mod:`.judges`), the forward screen of refusal openings
(:mod:`.openings`) and one point's measurement (:mod:`.probe`).

Example:
    >>> from safety_guard.measure.judges import KeywordJudge
    >>> KeywordJudge().is_refusal("I'm sorry, I can't help with that.")
    True
"""
