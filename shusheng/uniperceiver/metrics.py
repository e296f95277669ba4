"""Caption metrics: corpus BLEU-4 and CIDEr-D, as defined by the COCO caption evaluation code.

* BLEU-4 (Papineni et al. 2002): corpus-level clipped n-gram precisions for n = 1..4, geometric mean, brevity
  penalty against the *closest* reference length (coco-caption's ``Bleu(4)``, same tiny smoothing).
* CIDEr-D (Vedantam et al. 2015; coco-caption's ``Cider``): TF-IDF n-gram vectors (n = 1..4) with document
  frequencies over the reference sets of the evaluated images; per n the hypothesis-reference cosine with the
  hypothesis counts clipped to the reference counts, times a Gaussian length penalty
  ``exp(-(len_hyp - len_ref)**2 / (2 * 6**2))``; averaged over n and references, times 10.

Text is lower-cased and split into words with punctuation dropped (what the PTB tokenizer of coco-caption does
to these captions).
"""

from __future__ import annotations

import math
import re
from collections import Counter

__all__ = ["bleu4", "cider_d", "tokenize"]

_WORD = re.compile(r"[a-z0-9]+(?:[-'/][a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case words, punctuation removed."""
    return _WORD.findall(text.lower())


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 of ``hypotheses[i]`` against ``references[i]`` (one or more strings each)."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError("need one non-empty reference list per hypothesis")
    correct, guess = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        h = tokenize(hyp)
        rs = [tokenize(r) for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]  # closest reference length (ties: shorter)
        for n in range(1, 5):
            hc = _ngrams(h, n)
            max_ref: Counter = Counter()
            for r in rs:
                for g, c in _ngrams(r, n).items():
                    max_ref[g] = max(max_ref[g], c)
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in hc.items())
            guess[n - 1] += max(len(h) - n + 1, 0)
    tiny, small = 1e-15, 1e-9
    log_p = sum(math.log((correct[k] + tiny) / (guess[k] + small)) for k in range(4)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, tiny))
    return bp * math.exp(log_p)


def _vector(counts: list[Counter], df: Counter, log_n: float) -> tuple[list[dict], list[float]]:
    vec, norm = [], []
    for c in counts:
        v = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in c.items()}
        vec.append(v)
        norm.append(math.sqrt(sum(x * x for x in v.values())))
    return vec, norm


def cider_d(hypotheses: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (mean of the per-image scores) of ``hypotheses[i]`` against ``references[i]``."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError("need one non-empty reference list per hypothesis")
    hyp_counts = []
    ref_counts = []
    df: Counter = Counter()
    for hyp, refs in zip(hypotheses, references):
        h = tokenize(hyp)
        hyp_counts.append(([_ngrams(h, n) for n in range(1, 5)], len(h)))
        rc = []
        for r in refs:
            w = tokenize(r)
            rc.append(([_ngrams(w, n) for n in range(1, 5)], len(w)))
        ref_counts.append(rc)
        df.update({g for counts, _ in rc for c in counts for g in c})  # once per image
    log_n = math.log(float(len(hypotheses)))
    scores = []
    for (hc, hl), rcs in zip(hyp_counts, ref_counts):
        vh, nh = _vector(hc, df, log_n)
        total = [0.0] * 4
        for rc, rl in rcs:
            vr, nr = _vector(rc, df, log_n)
            penalty = math.exp(-((hl - rl) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                val = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vh[n].items())
                if nh[n] != 0 and nr[n] != 0:
                    val /= nh[n] * nr[n]
                total[n] += val * penalty
        scores.append(sum(total) / 4 / len(rcs) * 10.0)
    return sum(scores) / len(scores)
