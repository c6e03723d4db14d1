"""The VQA accuracy of the official VQAv2 evaluation, with its answer normalisation.

:func:`normalize_answer` follows the official ``vqaEval.py`` steps: lower-case; remove
punctuation (a period between digits is kept, a comma between digits is dropped, other marks
become nothing or a space as in the official rules); number words ``none zero one .. ten`` ->
digits; articles ``a an the`` dropped; common contractions without apostrophe restored
(``dont`` -> ``don't``).

:func:`vqa_accuracy` is the official *averaged* form: for ``n`` annotator answers, the mean over
the ``n`` leave-one-out subsets of ``min(#matches in the subset / 3, 1)`` (VQAv2: the 10 choose 9
subsets). With fewer than 4 answers the 3-vote rule cannot give full credit, so the answer
counts as correct (1.0) when it matches any of them, else 0.0.
"""
from __future__ import annotations

import re
from typing import Sequence

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't",
                 "havent": "haven't", "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't",
                 "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "whats": "what's",
                 "thats": "that's", "its": "it's", "lets": "let's"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation of one answer string."""
    text = " ".join(answer.replace("\n", " ").replace("\t", " ").strip().lower().split())
    text = _punctuation(text)
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of ``prediction`` against the annotators' ``answers`` (see module doc)."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if not gts:
        raise ValueError("vqa_accuracy: no reference answers")
    if len(gts) < 4:
        return float(pred in gts)
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)
