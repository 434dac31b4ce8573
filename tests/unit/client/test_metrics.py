"""mira.client.scoring against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mira.client.scoring import (
    accuracy_from_scores,
    exact_match,
    normalise_answer,
    rouge_l,
    score_texts,
    token_f1,
)
from mira.results.stats import summarise


def test_rouge_l_equal_length() -> None:
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)


def test_rouge_l_lin_2004_example() -> None:
    # Lin (2004): LCS("police killed the gunman", "the gunman was killed by police") = 2
    # ("the gunman"): P = 2/4, R = 2/6, F = 2PR / (P + R) = 0.4
    assert rouge_l("police killed the gunman", "the gunman was killed by police") == pytest.approx(
        0.4
    )


def test_rouge_l_bounds_and_stemming() -> None:
    assert rouge_l("Same words here.", "same words here") == pytest.approx(1.0)
    assert rouge_l("nothing shared", "entirely different") == 0.0
    assert rouge_l("", "a reference") == 0.0
    assert rouge_l("the dogs running", "the dog runs") == pytest.approx(1.0)  # Porter stems


def test_squad_normalisation() -> None:
    assert normalise_answer("The  Eiffel Tower, in Paris!") == "eiffel tower in paris"
    assert exact_match("The answer.", "answer") == 1.0
    assert exact_match("an apple", "apple pie") == 0.0


def test_token_f1_hand_computed() -> None:
    # "eiffel tower paris" vs "eiffel tower in paris": 3 shared, P = 3/3, R = 3/4
    assert token_f1("The Eiffel tower, Paris", "Eiffel Tower in Paris!") == pytest.approx(6 / 7)
    # a repeated token matches at most as often as it occurs in the reference: 1 shared
    assert token_f1("red red blue", "red green") == pytest.approx(2 * (1 / 3) * (1 / 2) / (5 / 6))
    assert token_f1("", "") == 1.0
    assert token_f1("the", "answer") == 0.0  # only an article left: empty vs non-empty
    assert token_f1("x", "y") == 0.0


def test_accuracy_from_scores_known_case() -> None:
    scores = np.array([[-1.0, -2.0], [-3.0, -0.5], [-0.1, -0.2], [-5.0, -5.0]])
    # predictions 0, 1, 0, 0 (a tie goes to the lowest index) against labels 0, 1, 1, 1
    assert accuracy_from_scores(scores, [0, 1, 1, 1]) == 0.5
    three = np.array([[0.0, 1.0, 2.0], [3.0, 1.0, 0.0], [0.0, 5.0, 1.0]])
    assert accuracy_from_scores(three, np.array([2, 0, 1])) == 1.0


def test_accuracy_from_scores_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        accuracy_from_scores(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="no examples"):
        accuracy_from_scores(np.zeros((0, 2)), [])


def test_score_texts_means_per_metric() -> None:
    result = score_texts(
        ["accuracy", "exact_match", "token_f1"], ["Paris", "the blue sky"], ["paris", "red sky"]
    )
    assert set(result) == {"exact_match", "token_f1"}
    assert result["exact_match"] == 0.5
    assert result["token_f1"] == pytest.approx((1.0 + 0.5) / 2)


def test_summarise_mean_and_worst_client() -> None:
    summary = summarise(
        {
            "accuracy": [0.5, 0.9, 0.7],
            "loss": [1.2, 0.8, 2.0],
            "rouge_l": [math.nan, 0.3],
            "token_f1": [],
        }
    )
    assert summary["accuracy"] == {"mean": pytest.approx(0.7), "worst": 0.5, "worst_index": 0}
    assert summary["loss"] == {"mean": pytest.approx(4 / 3), "worst": 2.0, "worst_index": 2}
    assert summary["rouge_l"] == {"mean": 0.3, "worst": 0.3, "worst_index": 1}
    assert "token_f1" not in summary
