"""The VQA accuracy of the official VQAv2 evaluation (GT-Vision-Lab/VQA, ``vqaEval.py``, master).

The rules, as the official ``VQAEval.evaluate`` applies them to one question:

1. The prediction and every annotator answer: ``\\n`` and ``\\t`` become spaces, then ``strip()``.
2. Only when the annotators disagree (more than one distinct answer after step 1, compared
   case-sensitively) are the answers AND the prediction normalised (:func:`normalize_answer`:
   punctuation, then digits/articles/contractions). When they all agree nothing else is done: the
   prediction must equal their answer exactly (``"Yes"`` or ``"yes."`` score 0 against ten ``"yes"``).
3. Score: for each annotator ``i``, ``min(1, m_i / 3)`` with ``m_i`` the number of the *other*
   annotators whose answer equals the prediction; the accuracy is the mean over the annotators
   (VQAv2: ten, so 1, 2, 3, 4+ matching annotators give 0.3, 0.6, 0.9, 1.0). One annotator
   always gives 0. (The official code leaves out ``item != gtAnsDatum`` by comparing answer
   records, which are distinct through their ``answer_id``; here the left-out one is by position.)

Punctuation (``processPunctuation``), on the text as given: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``
is deleted when it has a space on either side anywhere in the text, or when the text holds a
comma between two digits anywhere (``1,000``: then every mark is deleted); otherwise it becomes a
space. Then every period not followed by a digit is deleted (``3.5`` keeps it), at most 32 of them
(the official code passes ``re.UNICODE``, 32, as the ``count`` argument of ``re.sub``). Other
characters (``'``, ``:``, ``&``, ``#`` ...) are kept.

Digits and articles (``processDigitArticle``): lower-case, split on whitespace, map ``none zero
one .. ten`` to ``0 0 1 .. 10``, drop ``a an the``, then replace each word found in the official
contraction table (:data:`CONTRACTIONS`, kept exactly: ``dont`` -> ``don't``, but ``its``, ``lets``,
``im``, ``ive`` are not in it (its ``Im``/``Ive`` keys are capitalised and never match lower-case
words), ``somebody'd`` -> ``somebodyd``), and join with single spaces.
"""
from __future__ import annotations

import re
from typing import Sequence

_TABLE = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
#: the official contraction table, entry for entry (keys are matched against lower-case words)
CONTRACTIONS: dict[str, str] = dict(entry.split("=") for entry in _TABLE.split())
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # re.UNICODE (32) is the official call's positional ``count``


def clean_whitespace(text: str) -> str:
    """Step 1 of the official evaluation: newlines and tabs to spaces, ends stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation`` (see the module doc)."""
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if spaced or delete_all else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case words, number words to digits, articles
    dropped, contraction table applied."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official normalisation of one answer (whitespace, punctuation, digits/articles), as
    applied to every answer of a question whose annotators disagree."""
    return process_digit_article(process_punctuation(clean_whitespace(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQAv2 accuracy in [0, 1] of ``prediction`` against every annotator's answer
    (see the module doc for the rules)."""
    if not answers:
        raise ValueError("vqa_accuracy: no reference answers")
    gts = [clean_whitespace(a) for a in answers]
    pred = clean_whitespace(prediction)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(g)) for g in gts]
        pred = process_digit_article(process_punctuation(pred))
    hits = [g == pred for g in gts]
    total = sum(hits)
    # annotator i left out: the others match total - hits[i] times
    return sum(min(1.0, (total - h) / 3.0) for h in hits) / len(gts)
