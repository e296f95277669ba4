"""BLEU-4 and CIDEr-D against values computed by hand from their definitions."""

from __future__ import annotations

import math

import pytest

from shusheng.uniperceiver.metrics import bleu4, cider_d, tokenize


def test_tokenize_drops_punctuation_and_case():
    assert tokenize("A red car, a 30 km/h sign; two give-way signs.") == [
        "a", "red", "car", "a", "30", "km/h", "sign", "two", "give-way", "signs"]


def test_bleu4_hand_computed():
    assert bleu4(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    # p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, equal lengths (no brevity penalty)
    want = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(want, rel=1e-9)
    # brevity penalty against the closest reference length: c = 4, r = 5 -> exp(1 - 5/4)
    got = bleu4(["a b c d"], [["a b c d e", "x y z w v u v"]])
    assert got == pytest.approx(math.exp(1 - 5 / 4), rel=1e-6)


def test_cider_d_hand_computed():
    # two images, one reference each, no shared words: identical captions score 10 * mean(1, 1, 0, 0) = 5
    assert cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    # one extra word: n=1 cosine 2/sqrt(6), n=2 cosine 1/sqrt(2), n=3,4: 0; length penalty exp(-1/72)
    want_a = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    got = cider_d(["a b x", "c d"], [["a b"], ["c d"]])
    assert got == pytest.approx((want_a + 5.0) / 2, rel=1e-9)
    # an n-gram in every image's references has idf 0 and contributes nothing
    assert cider_d(["z", "z"], [["z a"], ["z b"]]) == pytest.approx(0.0)
    # clipping: repeating a matched word does not raise the score above the single-word match
    one = cider_d(["a", "c"], [["a"], ["c"]])
    rep = cider_d(["a a", "c"], [["a"], ["c"]])
    assert rep < one


def test_metric_inputs_checked():
    with pytest.raises(ValueError):
        cider_d(["a"], [])
    with pytest.raises(ValueError):
        bleu4([], [])
