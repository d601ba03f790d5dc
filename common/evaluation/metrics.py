"""Answer-scoring metrics for the evaluation loops (spec section 6).

Two metrics are used by the recipes:

* ANLS (DocVQA). The prediction is stripped of surrounding whitespace and of trailing '.'
  characters; references only of surrounding whitespace. For each reference
  ``nl = levenshtein(p, g) / max(len(p), len(g))`` and the score is ``1 - nl`` when
  ``nl < threshold`` else 0; an example scores the maximum over its references.
  Comparison is case-SENSITIVE by default: the spec's formula (the reference recipe, whose
  published numbers in spec section 7 we compare against) does not lowercase. The official
  DocVQA leaderboard lowercases both sides; pass ``ignore_case=True`` to get that variant.
* Accuracy (hateful memes, NLVR2, UCF-101): exact match after :func:`normalize_answer`.
* Strict exact match (``exact_match`` in :data:`SCORERS`, for `finetune_hf_trainer_custom.py`): the answer
  equals a reference once whitespace at either end is stripped; case and dots count.

Every per-example scorer has the signature ``(prediction: str, references: list[str]) -> float``,
so an evaluation loop looks it up by name in :data:`SCORERS`; a split's score is the mean of its
examples' (`common.evaluation.generation.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import Levenshtein

__all__ = [
    "levenshtein",
    "normalize_answer",
    "anls",
    "exact_match",
    "strict_match",
    "SCORERS",
]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each costs 1) between two strings.

    Counted in Unicode code points, the unit of ``len`` that ANLS divides by.
    """
    # The maintained package the reference recipe installs (bit-parallel C++ via rapidfuzz): about
    # 250x faster than a dynamic programme in Python on answer-length strings, and one less thing of our
    # own to get right. tests/test_metrics.py keeps such a programme as the oracle it is checked against.
    return Levenshtein.distance(a, b)


def normalize_answer(text: str) -> str:
    """Normalise an answer for accuracy: strip whitespace, then '.', then whitespace, lowercase.

    Dots are removed from both ends (``str.strip('.')``), so "Yes." and "yes" match; the second
    whitespace strip catches answers such as "yes ." where a space precedes the full stop.
    """
    return text.strip().strip(".").strip().lower()


def _clean_prediction_for_anls(text: str) -> str:
    # Only trailing dots: a leading '.' can be part of a DocVQA answer (".5 mg").
    return text.strip().rstrip(".").strip()


def _check_references(references: Sequence[str]) -> None:
    # A bare string would otherwise be iterated character by character and score silently wrong.
    if isinstance(references, str):
        raise TypeError("references must be a list of strings, not a single string")
    if len(references) == 0:
        raise ValueError("each example needs at least one reference answer")


def anls(
    prediction: str,
    references: Sequence[str],
    threshold: float = 0.5,
    ignore_case: bool = False,
) -> float:
    """Normalised Levenshtein similarity of one prediction, best over its references."""
    _check_references(references)
    pred = _clean_prediction_for_anls(prediction)
    if ignore_case:
        pred = pred.lower()
    best = 0.0
    for reference in references:
        ref = reference.strip()
        if ignore_case:
            ref = ref.lower()
        longest = max(len(pred), len(ref))
        if longest == 0:
            # Both empty: the answers agree, and dividing by zero would crash the loop.
            return 1.0
        nl = levenshtein(pred, ref) / longest
        score = 1.0 - nl if nl < threshold else 0.0
        best = max(best, score)
    return best


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    _check_references(references)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


def strict_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction equals any reference, whitespace at either end aside, else 0.0."""
    _check_references(references)
    return float(any(prediction.strip() == ref.strip() for ref in references))


SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "anls": anls,
    "accuracy": exact_match,
    "exact_match": strict_match,
}


