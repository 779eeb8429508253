"""GLUE metrics against values computed by hand."""
import math

import pytest

from bert_jax import glue_metrics


def test_matthews_f1_accuracy_by_hand():
    predictions, labels = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]
    # TP=2 FP=1 TN=2 FN=0: MCC = (2*2 - 1*0) / sqrt(3*2*3*2) = 4/6
    assert glue_metrics.compute_metrics("mcc", predictions, labels)["mcc"] == pytest.approx(4 / 6)
    scores = glue_metrics.compute_metrics("f1_accuracy", predictions, labels)
    # precision 2/3, recall 1 -> F1 0.8; 4 of 5 right
    assert scores == pytest.approx({"f1": 0.8, "accuracy": 0.8, "f1_accuracy": 0.8})
    assert glue_metrics.compute_metrics("accuracy", [0, 2, 1, 2], [0, 1, 1, 2])["accuracy"] == 0.75
    assert glue_metrics.compute_metrics("mcc", [1, 1, 1], [1, 0, 1])["mcc"] == 0.0  # constant guess


def test_correlations_by_hand():
    # x dev (-1.5,-.5,.5,1.5), y dev (-1.75,-.75,.25,2.25): r = 6.5 / sqrt(5 * 8.75)
    scores = glue_metrics.compute_metrics("correlation", [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0])
    assert scores["pearson"] == pytest.approx(6.5 / math.sqrt(43.75))
    assert scores["spearman"] == pytest.approx(1.0)
    assert scores["correlation"] == pytest.approx((6.5 / math.sqrt(43.75) + 1) / 2)
    reverse = glue_metrics.compute_metrics("correlation", [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 5.0])
    assert reverse["spearman"] == pytest.approx(-1.0)
    constant = glue_metrics.compute_metrics("correlation", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(constant["pearson"])


def test_reductions_and_errors():
    assert glue_metrics.mean_std([0.8, 0.6]) == pytest.approx({"mean": 0.7, "std": math.sqrt(0.02), "n": 2})
    assert glue_metrics.mean_std([0.5, float("nan")])["std"] == 0.0
    assert glue_metrics.best_index([0.2, float("nan"), 0.5, 0.4]) == 2
    with pytest.raises(ValueError, match="shape"):
        glue_metrics.compute_metrics("accuracy", [1, 0], [1])
    with pytest.raises(ValueError, match="unknown metric kind 'acc'"):
        glue_metrics.compute_metrics("acc", [1], [1])
