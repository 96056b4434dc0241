import pytest

from sgl_cli.engine.metrics import (
    DEFAULT_METRIC,
    METRICS,
    contains,
    exact,
    get_metric,
    normalize_answer,
    vqa,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("  The   Red circle. ", "red circle"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("It costs 2.5 dollars.", "it costs 2.5 dollars"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("Don't", "don't"),
        ("yes!", "yes"),
        ("red/blue", "red blue"),
        ("twelve", "12"),
        ("twenty", "20"),
        ("none", "0"),
        ("A", "a"),  # a lone article stays: multiple-choice letter, not an empty answer
        ("\tleft\n", "left"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("Two", "2", 1.0),
        ("The red circle.", "red circle", 1.0),
        ("1,000", "1000", 1.0),
        ("2.5", "25", 0.0),  # the decimal point is kept, so these differ
        ("dont know", "don't know", 1.0),
        ("red", "blue", 0.0),
        ("B", "A", 0.0),
        ("", "A", 0.0),
        ("blue", ["red", "Blue."], 1.0),
        ("green", ["red", "blue"], 0.0),
    ],
)
def test_exact(prediction, reference, expected):
    assert exact(prediction, reference) == expected


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("it is red", "red", 1.0),
        ("reddish", "red", 0.0),
        ("The circle is dark red.", "dark red", 1.0),
        ("red and dark", "dark red", 0.0),  # words must be contiguous and in order
        ("there are two dogs", "2", 1.0),
        ("there are 12 dogs", "2", 0.0),
        ("it is blue", ["red", "blue"], 1.0),
        ("it is green", ["red", "blue"], 0.0),
        ("anything", ".", 0.0),  # a reference that normalises to nothing matches nothing
    ],
)
def test_contains(prediction, reference, expected):
    assert contains(prediction, reference) == expected


def _refs(n_match: int, answer: str = "2") -> list[str]:
    return [answer] * n_match + ["3"] * (10 - n_match)


@pytest.mark.parametrize(
    "n_match, expected",
    [
        # Leave-one-out over 10 references, score min(1, matches/3) per subset of 9:
        (0, 0.0),
        # 1 match: 9 subsets keep it (1/3), 1 drops it (0) -> 9*(1/3)/10 = 0.3
        (1, 0.3),
        # 2 matches: 8 subsets keep both (2/3), 2 keep one (1/3) -> (8*2/3 + 2*1/3)/10 = 0.6
        (2, 0.6),
        # 3 matches: 7 subsets keep 3 (1), 3 keep 2 (2/3) -> (7 + 3*2/3)/10 = 0.9
        (3, 0.9),
        # 4 matches: every subset keeps at least 3 -> 1.0
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_ten_references(n_match, expected):
    assert vqa("two", _refs(n_match)) == pytest.approx(expected)


def test_vqa_few_references():
    assert vqa("red", ["red"]) == 1.0  # one reference: exact match
    assert vqa("red", ["blue"]) == 0.0
    # 2 references, both match: each leave-one-out subset has 1 match -> 1/3
    assert vqa("red", ["red", "red"]) == pytest.approx(1 / 3)


def test_vqa_single_string_equals_exact():
    for pred, ref in [("Two", "2"), ("red", "blue"), ("The cat.", "cat")]:
        assert vqa(pred, ref) == exact(pred, ref)


def test_empty_reference_list_rejected():
    with pytest.raises(ValueError, match="reference"):
        exact("red", [])


def test_registry():
    assert DEFAULT_METRIC == "vqa"
    assert set(METRICS) == {"exact", "contains", "vqa"}
    assert get_metric("contains") is contains
    with pytest.raises(ValueError) as err:
        get_metric("bleu")
    assert "bleu" in str(err.value)
    for name in METRICS:
        assert name in str(err.value)
