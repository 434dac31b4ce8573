"""Task metrics as pure functions of texts and arrays (no model, no files, no config).

* ``accuracy`` -- classification by the verbaliser with the highest log-likelihood after the
  prompt (rank classification, as in T0 / FLAN evaluation): :func:`accuracy_from_scores`.
* ``rouge_l`` -- ROUGE-L F-measure (Lin, 2004) of a generated text, with rouge-score's
  tokeniser and Porter stemming (as reported for XSum).
* ``exact_match`` and ``token_f1`` -- the SQuAD v1.1 evaluation (Rajpurkar et al., 2016):
  lowercase, drop punctuation and the articles a/an/the, split on whitespace.

Their names are :data:`mira.config.TASK_METRICS`; :func:`mira.results.stats.summarise`
reduces per-client values to the mean and the worst client.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised texts are equal, else 0.0."""
    return float(normalise_answer(prediction) == normalise_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bag of normalised tokens shared by prediction and reference.

    Two empty texts score 1.0 and one empty text 0.0, as in the SQuAD script.
    """
    pred = normalise_answer(prediction).split()
    ref = normalise_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: longest common subsequence of (stemmed) tokens, in [0, 1]."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def accuracy_from_scores(scores: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Fraction of rows whose highest score (verbaliser log-likelihood) is the true label.

    Args:
        scores: [n, n_labels] log-likelihood of each verbaliser after each prompt.
        labels: [n] index of the true verbaliser.

    Ties go to the lowest label index (``argmax``), so a model that scores every label the
    same is no better than always answering label 0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(labels)
    if scores.ndim != 2 or truth.shape != (scores.shape[0],):
        raise ValueError(f"scores {scores.shape} and labels {truth.shape} do not match")
    if scores.shape[0] == 0:
        raise ValueError("no examples to score")
    return float(np.mean(np.argmax(scores, axis=1) == truth))


TEXT_METRICS: dict[str, Callable[[str, str], float]] = {
    "rouge_l": rouge_l,
    "exact_match": exact_match,
    "token_f1": token_f1,
}


def score_texts(
    names: Sequence[str], predictions: Sequence[str], references: Sequence[str]
) -> dict[str, float]:
    """Mean of each text metric in ``names`` (``accuracy`` is skipped) over aligned pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no examples to score")
    result = {}
    for name in names:
        if name in TEXT_METRICS:
            metric = TEXT_METRICS[name]
            values = [metric(p, r) for p, r in zip(predictions, references, strict=True)]
            result[name] = float(np.mean(values))
    return result
