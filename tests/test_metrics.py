import random

import pytest

from common.evaluation.metrics import (
    SCORERS,
    anls,
    exact_match,
    levenshtein,
    normalize_answer,
)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("kitten", "sitting", 3),
        ("sitting", "kitten", 3),
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("flaw", "lawn", 2),
        ("a", "b", 1),
        ("intention", "execution", 5),
    ],
)
def test_levenshtein(a, b, expected):
    assert levenshtein(a, b) == expected
    assert oracle_levenshtein(a, b) == expected


def oracle_levenshtein(a: str, b: str) -> int:
    """The textbook dynamic programme, slow but plainly right: the oracle for the package's distance."""
    # Iterating over the longer string keeps the two rows as short as possible.
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


# Beyond ASCII: a combining accent and its precomposed form, CJK, emoji outside the BMP (two UTF-16
# units each), a lone surrogate, NUL, and U+0161 and U+10061, whose low 8 and 16 bits are those of 'a':
# an implementation truncating characters would confuse them with it.
UNICODE = "ae\u0301\u00e9\u6f22\u5b57\U0001f600\U0001f44d\U0001f3fd\u200d\ud800\x00\u0161\U00010061"
ALPHABETS = ["ab", "abcdefghij ", "".join(map(chr, range(32, 127))), UNICODE]


def _random_pair(rng: random.Random, max_length: int) -> tuple[str, str]:
    alphabet = rng.choice(ALPHABETS)
    a = "".join(rng.choices(alphabet, k=rng.choice([0, rng.randint(0, max_length)])))
    if rng.random() < 0.5:
        return a, "".join(rng.choices(alphabet, k=rng.randint(0, max_length)))
    # A few edits of `a`: near matches, the case ANLS scores, where distances are small.
    b = list(a)
    for _ in range(rng.randint(0, 1 + max_length // 10)):
        position = rng.randint(0, len(b))
        operation = rng.choice(["insert", "delete", "substitute"])
        if operation == "insert" or position == len(b):
            b.insert(position, rng.choice(alphabet))
        elif operation == "delete":
            del b[position]
        else:
            b[position] = rng.choice(alphabet)
    return a, "".join(b)


def test_levenshtein_agrees_with_the_oracle_on_random_strings():
    rng = random.Random(13)
    # Short answers, then strings past 64 and 128 characters, where bit-parallel implementations switch
    # from one machine word to several.
    pairs = [_random_pair(rng, 24) for _ in range(3000)] + [_random_pair(rng, 300) for _ in range(40)]
    assert any(not a or not b for a, b in pairs) and any(min(len(a), len(b)) > 128 for a, b in pairs)
    mismatches = [(a, b) for a, b in pairs if levenshtein(a, b) != oracle_levenshtein(a, b)]
    assert not mismatches, mismatches[:5]


def test_levenshtein_counts_code_points_like_len():
    # ANLS divides the distance by max(len(p), len(g)), so both must count the same units.
    for text in ["\U0001f600", "\u6f22\u5b57", "e\u0301", "\ud800", "\U0001f44d\U0001f3fd"]:
        assert levenshtein(text, "") == len(text)
    assert levenshtein("\U0001f600", "\U0001f601") == 1
    # No Unicode normalisation: the precomposed and the combining spelling differ in code points.
    assert levenshtein("\u00e9", "e\u0301") == 2
    assert anls("\U0001f600" * 4 + "a", ["\U0001f600" * 4 + "b"]) == pytest.approx(0.8)


def test_anls_exact_match_is_one():
    assert anls("Acme Corp", ["Acme Corp"]) == 1.0


def test_anls_near_match():
    # One substitution in five characters.
    assert anls("hallo", ["hello"]) == pytest.approx(0.8)


def test_anls_far_match_scores_zero():
    # 3 edits / 4 characters = 0.75 >= 0.5
    assert anls("abcd", ["axyz"]) == 0.0


def test_anls_exactly_at_threshold_scores_zero():
    # 2 edits / 4 characters = 0.5, and only nl < 0.5 earns credit.
    assert anls("abcd", ["abxy"]) == 0.0
    # Just under the threshold: 2 / 5 = 0.4 -> 0.6.
    assert anls("abcde", ["abxye"]) == pytest.approx(0.6)


def test_anls_takes_the_best_reference():
    assert anls("hallo", ["nothing alike", "hello", "hallo!"]) == pytest.approx(5 / 6)
    assert anls("hallo", ["xyz", "hallo"]) == 1.0


def test_anls_empty_prediction():
    assert anls("", ["answer"]) == 0.0
    assert anls("  . ", ["answer"]) == 0.0


def test_anls_both_empty_is_one():
    assert anls("", [""]) == 1.0
    assert anls(" ", ["x", ""]) == 1.0


def test_anls_strips_whitespace_and_trailing_dot():
    assert anls("  42 Main St. ", ["42 Main St"]) == 1.0
    assert anls("yes.\n", ["yes"]) == 1.0
    # A leading dot is content (".5 mg"), not punctuation.
    assert anls(".5 mg", [".5 mg"]) == 1.0
    # References only lose whitespace, as in the spec.
    assert anls("Inc", [" Inc. "]) == pytest.approx(0.75)


def test_anls_is_case_sensitive_by_default():
    # "Paris" vs "PARIS": 4 substitutions / 5 -> nl 0.8 -> 0.
    assert anls("Paris", ["PARIS"]) == 0.0
    assert anls("Paris", ["PARIS"], ignore_case=True) == 1.0
    assert anls("hello world", ["Hello world"]) == pytest.approx(1 - 1 / 11)


def test_anls_custom_threshold():
    assert anls("abcd", ["abxy"], threshold=0.6) == pytest.approx(0.5)


def test_anls_rejects_bare_string_and_no_references():
    with pytest.raises(TypeError):
        anls("a", "a")
    with pytest.raises(ValueError):
        anls("a", [])


def test_anls_per_example():
    preds = ["hello", "hallo", "abcd", ""]
    refs = [["hello"], ["hello"], ["wxyz"], [""]]
    assert [anls(p, r) for p, r in zip(preds, refs)] == pytest.approx([1.0, 0.8, 0.0, 1.0])


@pytest.mark.parametrize(
    "raw, expected",
    [("Yes.", "yes"), (" True ", "true"), ("  No . ", "no"), ("...ok..", "ok"), ("", "")],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_accuracy_normalises():
    preds = ["Yes.", " True ", "no", "ApplyLipstick"]
    refs = ["yes", "true", "yes", "applylipstick."]
    assert [SCORERS["accuracy"](p, [r]) for p, r in zip(preds, refs)] == [1.0, 1.0, 0.0, 1.0]


def test_exact_match_with_several_references():
    assert exact_match("False", ["no", "false"]) == 1.0
    assert exact_match("maybe", ["no", "false"]) == 0.0
    assert exact_match("a", ["A."]) == 1.0 and exact_match("b", ["c", "d"]) == 0.0


def test_scorers_by_name():
    preds = ["Hello.", "b"]
    refs = [["hello", "hi"], ["c"]]
    assert set(SCORERS) == {"anls", "accuracy", "exact_match"}
    assert [SCORERS["accuracy"](p, r) for p, r in zip(preds, refs)] == [1.0, 0.0]
    assert [SCORERS["exact_match"](p, r) for p, r in zip(preds, refs)] == [0.0, 0.0]
