"""Caption metrics as in the COCO caption toolkit (pycocoevalcap), in pure Python (no Java).

* :func:`tokenize`: lower-case, punctuation removed, split on whitespace (what the toolkit's
  PTB tokenizer does to plain English captions, minus its Java).
* :func:`bleu` — corpus BLEU-1..4 as the toolkit's ``Bleu(4)``: n-gram counts clipped by the
  maximum count in any reference, summed over the corpus; brevity penalty against the
  *closest* reference length per hypothesis (ties to the shorter); ``p_n = (correct + 1e-15) /
  (guess + 1e-9)``; BLEU-n is the geometric mean of ``p_1..p_n`` times the penalty.
* :func:`cider_d` — CIDEr-D as the toolkit's ``Cider``: tf-idf vectors of n-grams n = 1..4 with
  document frequencies counted over the reference sets of the evaluated images (idf = log(#images)
  - log(max(1, df))), per-n cosine with the hypothesis weights clipped to the reference weights,
  a gaussian length penalty ``exp(-(len_h - len_r)^2 / (2 * 6^2))``, averaged over n and over
  the references, times 10. (As in the toolkit, the "length" is the number of bigrams.)

Scores are returned as the toolkit computes them (BLEU in [0, 1], CIDEr-D about 0..10); the
caption task reports both x100, like papers (BLIP COCO CIDEr 133.3).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-case, drop punctuation, split on whitespace."""
    return _PUNCT.sub(" ", text.lower()).split()


def ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams of length ``n`` of ``words``."""
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..``max_n`` of hypotheses ``hyps[i]`` against reference lists ``refs[i]``."""
    if len(hyps) != len(refs):
        raise ValueError(f"bleu: {len(hyps)} hypotheses but {len(refs)} reference lists")
    correct, guess = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, refs):
        h = tokenize(hyp)
        toks = [tokenize(r) for r in rs]
        hyp_len += len(h)
        ref_len += min((abs(len(t) - len(h)), len(t)) for t in toks)[1]
        for n in range(1, max_n + 1):
            max_ref: Counter = Counter()
            for t in toks:
                max_ref |= ngrams(t, n)
            hc = ngrams(h, n)
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in hc.items())
            guess[n - 1] += max(len(h) - n + 1, 0)
    tiny, small = 1e-15, 1e-9
    ratio = (hyp_len + tiny) / (ref_len + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    out, prod = [], 1.0
    for n in range(max_n):
        prod *= (correct[n] + tiny) / (guess[n] + small)
        out.append(prod ** (1 / (n + 1)) * penalty)
    return out


def _vector(counts: dict[int, Counter], df: Counter, log_docs: float):
    vec = [dict() for _ in range(4)]
    norm = [0.0] * 4
    length = 0
    for n in range(4):
        for g, tf in counts[n + 1].items():
            w = tf * (log_docs - math.log(max(1.0, df[g])))
            vec[n][g] = w
            norm[n] += w * w
        if n == 1:
            length = sum(counts[2].values())
    return vec, [math.sqrt(x) for x in norm], length


def _sim(vh, vr, nh, nr, lh, lr, sigma: float) -> list[float]:
    delta = float(lh - lr)
    out = []
    for n in range(4):
        val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
        if nh[n] != 0 and nr[n] != 0:
            val /= nh[n] * nr[n]
        out.append(val * math.exp(-(delta ** 2) / (2 * sigma ** 2)))
    return out


def cider_d(hyps: Sequence[str], refs: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (the mean over images of the per-image score, toolkit scale)."""
    if len(hyps) != len(refs):
        raise ValueError(f"cider_d: {len(hyps)} hypotheses but {len(refs)} reference lists")
    if not hyps:
        return 0.0

    def cook(text: str) -> dict[int, Counter]:
        words = tokenize(text)
        return {n: ngrams(words, n) for n in range(1, 5)}

    ref_counts = [[cook(r) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rcs in ref_counts:
        df.update({g for rc in rcs for n in range(1, 5) for g in rc[n]})
    log_docs = math.log(float(len(refs)))
    scores = []
    for hyp, rcs in zip(hyps, ref_counts):
        vh, nh, lh = _vector(cook(hyp), df, log_docs)
        total = [0.0] * 4
        for rc in rcs:
            vr, nr, lr = _vector(rc, df, log_docs)
            total = [a + b for a, b in zip(total, _sim(vh, vr, nh, nr, lh, lr, sigma))]
        scores.append(sum(total) / 4 / len(rcs) * 10.0)
    return sum(scores) / len(scores)
