"""Answer-correctness metrics for short VLM answers, in the style of VQA evaluations.

Every metric has the signature ``f(prediction, reference) -> float`` with a value in
[0, 1], where ``reference`` is one answer string or a list of acceptable answers.
Both sides go through :func:`normalize_answer` (the VQAv2 normalisation) first.

``DEFAULT_METRIC`` is ``"vqa"``: VQAv2, GQA, TextVQA, VizWiz and OK-VQA score short
answers by normalised exact match or by its soft version over the annotators'
answers, so numbers computed with it are comparable with published results.  With
a single reference (GQA-style data, or most hand-labelled sets) ``vqa`` is the same
as ``exact``, so the default costs nothing when only one answer is known.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Reference = str | Sequence[str]
Metric = Callable[[str, Reference], float]

# "1,000" -> "1000": a comma between digits is a thousands separator, not punctuation.
_COMMA_IN_NUMBER = re.compile(r"(?<=\d),(?=\d)")
# Periods go, except a decimal point ("2.5", ".5"), as in the official script.
_PERIOD = re.compile(r"\.(?!\d)")
# The apostrophe is deliberately absent: it is part of contractions ("don't").
_PUNCTUATION = re.compile(r"[;:/\[\]\"{}()<>=+\\_\-@`,?!*#%&|~^$]")

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    # "none" -> "0" follows the official script ("how many ...?" -> "none").
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
    "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
    "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
    "nineteen": "19", "twenty": "20",
}
# Apostrophe-less spellings -> the canonical contraction (a subset of the VQA table).
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hasnt": "hasn't", "havent": "haven't", "hes": "he's", "im": "i'm",
    "isnt": "isn't", "ive": "i've", "mightnt": "mightn't", "mustnt": "mustn't",
    "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've",
    "thats": "that's", "theres": "there's", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wheres": "where's",
    "whos": "who's", "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've",
    "youre": "you're", "youve": "you've",
}


def _tokens(s: str) -> list[str]:
    s = s.lower().replace("\u2019", "'")  # typographic apostrophe -> ASCII
    s = _COMMA_IN_NUMBER.sub("", s)
    s = _PERIOD.sub("", s)
    s = _PUNCTUATION.sub(" ", s)
    words = [_CONTRACTIONS.get(w, _NUMBER_WORDS.get(w, w)) for w in s.split()]
    # Keep a lone article: otherwise the answer "A" (a multiple-choice letter)
    # would normalise to "" and match an empty prediction.
    return [w for w in words if w not in _ARTICLES] or words


def normalize_answer(s: str) -> str:
    """VQAv2-style normalisation: case, punctuation, articles, number words, contractions."""
    return " ".join(_tokens(s))


def _references(reference: Reference) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise ValueError("empty list of reference answers")
    return refs


def exact(prediction: str, reference: Reference) -> float:
    """1.0 if the normalised prediction equals any normalised reference."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _references(reference)))


def _contains_words(haystack: list[str], needle: list[str]) -> bool:
    if not needle:  # an empty reference only "occurs" in an empty prediction
        return not haystack
    k = len(needle)
    return any(haystack[i : i + k] == needle for i in range(len(haystack) - k + 1))


def contains(prediction: str, reference: Reference) -> float:
    """1.0 if any normalised reference occurs in the prediction as whole words."""
    pred = _tokens(prediction)
    return float(any(_contains_words(pred, _tokens(r)) for r in _references(reference)))


def vqa(prediction: str, reference: Reference) -> float:
    """VQAv2 soft accuracy: min(1, matches / 3), averaged over leave-one-out subsets.

    The official script scores against each subset of the references that leaves one
    annotator out, so with 10 references 3 matches give 0.9 and 4 or more give 1.0.
    With one reference there is no subset left, and the score is exact match.
    """
    refs = _references(reference)
    if len(refs) == 1:
        return exact(prediction, refs[0])
    pred = normalize_answer(prediction)
    hits = [pred == normalize_answer(r) for r in refs]
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(hits)


METRICS: dict[str, Metric] = {"exact": exact, "contains": contains, "vqa": vqa}
DEFAULT_METRIC = "vqa"


def get_metric(name: str) -> Metric:
    """The metric called ``name``; ValueError listing the known names otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        known = ", ".join(sorted(METRICS))
        raise ValueError(f"unknown metric {name!r}; known metrics: {known}") from None
