"""GLUE dev metrics (scikit-learn, scipy) and the reductions used to pick and report runs.

`compute_metrics(kind, predictions, labels)` returns a flat dict of floats:
  mcc          -> {'mcc'}                                   CoLA
  accuracy     -> {'accuracy'}                              SST-2, MNLI (per dev set), QNLI, RTE, WNLI
  f1_accuracy  -> {'f1', 'accuracy', 'f1_accuracy'}         MRPC, QQP (f1_accuracy: their mean)
  correlation  -> {'pearson', 'spearman', 'correlation'}    STS-B (correlation: their mean)
Predictions are class ids (or scores for STS-B); labels likewise.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.stats
from sklearn import metrics as skm

METRIC_KINDS = ("mcc", "accuracy", "f1_accuracy", "correlation")


def compute_metrics(kind: str, predictions, labels) -> dict[str, float]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    if predictions.size == 0:
        raise ValueError("no examples to score")
    if kind == "mcc":
        return {"mcc": float(skm.matthews_corrcoef(labels, predictions))}
    if kind == "accuracy":
        return {"accuracy": float(skm.accuracy_score(labels, predictions))}
    if kind == "f1_accuracy":
        f1 = float(skm.f1_score(labels, predictions, zero_division=0.0))
        accuracy = float(skm.accuracy_score(labels, predictions))
        return {"f1": f1, "accuracy": accuracy, "f1_accuracy": (f1 + accuracy) / 2}
    if kind == "correlation":
        with warnings.catch_warnings():  # constant predictions: correlation undefined -> nan
            warnings.simplefilter("ignore")
            pearson = float(scipy.stats.pearsonr(predictions, labels)[0])
            spearman = float(scipy.stats.spearmanr(predictions, labels)[0])
        return {"pearson": pearson, "spearman": spearman, "correlation": (pearson + spearman) / 2}
    raise ValueError(f"unknown metric kind {kind!r}; expected one of {METRIC_KINDS}")


def mean_std(values) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), ignoring nan."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return {"mean": float(finite.mean()), "std": std, "n": int(finite.size)}


def best_index(scores) -> int:
    """Index of the highest score; nan (undefined metric) ranks last."""
    keyed = [(-math.inf if s is None or not math.isfinite(s) else s) for s in scores]
    return int(np.argmax(keyed))
