"""A spam filter's operating point: how much spam it catches at a fixed loss of legitimate mail.

Plain NumPy on scores (the calibrated probability of the positive class) and true labels
(1 = positive, spam). A message is flagged when its score is >= the threshold. The curves count
every distinct score as a threshold, as scikit-learn's `roc_curve` and
`precision_recall_curve` do, and `average_precision` is theirs: the precision at each recall
step, weighted by the step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def default_positive(labels) -> str | None:
    """Of two labels, 'spam' where it is one, else the second (what spamray assumed before the
    positive class was recorded); None for other label sets."""
    if len(labels) != 2:
        return None
    return "spam" if "spam" in labels else labels[1]


# Recall is reported at these false-positive rates (the TREC spam track reports such points).
REPORTED_FPRS = (0.001, 0.005, 0.01)


def _counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds from high to low, true positives, false positives flagged at each)."""
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(labels)[last_of_each]
    false_positives = (1 + last_of_each) - true_positives
    return scores[last_of_each], true_positives, false_positives


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates, thresholds), starting at (0, 0) with an
    infinite threshold, as scikit-learn's `roc_curve(drop_intermediate=False)`."""
    scores, labels = _checked(scores, labels)
    thresholds, tp, fp = _counts(scores, labels)
    positives, negatives = labels.sum(), len(labels) - labels.sum()
    return (np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives], np.r_[np.inf, thresholds])


def roc_auc(scores, labels) -> float:
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.trapezoid(tpr, fpr))


def precision_recall_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) by increasing threshold, ending at precision 1, recall 0,
    as scikit-learn's `precision_recall_curve`."""
    scores, labels = _checked(scores, labels)
    thresholds, tp, fp = _counts(scores, labels)
    precision, recall = tp / (tp + fp), tp / labels.sum()
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(scores, labels) -> float:
    precision, recall, _ = precision_recall_curve(scores, labels)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def threshold_for_fpr(ham_scores, target_fpr: float) -> float:
    """The lowest threshold that flags at most `target_fpr` of these legitimate messages: the
    filter catches the most spam the budget allows. (Flagged: score >= threshold.)"""
    ham = np.sort(np.asarray(ham_scores, dtype=np.float64))[::-1]
    if ham.size == 0:
        raise ValueError("no legitimate messages to choose a threshold on")
    allowed = int(np.floor(target_fpr * ham.size + 1e-9))  # flagged ham the budget allows
    # Just above the (allowed+1)-th highest ham score: that one and all below it pass.
    return float(np.nextafter(ham[allowed], np.inf)) if allowed < ham.size else float(ham[-1])


def rates_at(threshold: float, scores, labels) -> dict[str, float]:
    """False-positive rate, recall and precision when flagging scores >= threshold."""
    scores, labels = _checked(scores, labels)
    flagged = scores >= threshold
    tp, fp = int((flagged & (labels == 1)).sum()), int((flagged & (labels == 0)).sum())
    negatives, positives = int((labels == 0).sum()), int((labels == 1).sum())
    return {"threshold": float(threshold), "false_positive_rate": fp / negatives if negatives else float("nan"),
            "recall": tp / positives if positives else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "flagged_ham": fp, "ham": negatives, "caught_spam": tp, "spam": positives}


def recall_at_fpr(scores, labels, target_fpr: float) -> float:
    """The most spam caught while flagging at most `target_fpr` of the legitimate messages
    (the point of the ROC curve, on these messages)."""
    scores, labels = _checked(scores, labels)
    return rates_at(threshold_for_fpr(scores[labels == 0], target_fpr), scores, labels)["recall"]


# -- calibration -----------------------------------------------------------------------------
def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels (probs: rows of class probabilities)."""
    picked = np.clip(np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels], 1e-15, 1.0)
    return float(-np.mean(np.log(picked)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al. (2017): |accuracy - confidence| per confidence bin, weighted by the bin's share."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        members = (confidence > low) & (confidence <= high)
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 that minimises the log loss of
    softmax(logits / T) on held-out data. One parameter, so a bounded search in log T (golden
    section) finds it without a gradient; it never changes which class is most probable."""
    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    loss = lambda log_t: log_loss(softmax(logits, float(np.exp(log_t))), labels)  # noqa: E731
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    for _ in range(80):
        if loss(a) < loss(b):
            high, b = b, a
            a = high - ratio * (high - low)
        else:
            low, a = a, b
            b = low + ratio * (high - low)
    return float(np.exp((low + high) / 2))


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """Log loss and expected calibration error of softmax(logits) and of softmax(logits / T)."""
    before, after = softmax(logits), softmax(logits, temperature)
    return {"log_loss_before": log_loss(before, labels), "log_loss_after": log_loss(after, labels),
            "ece_before": expected_calibration_error(before, labels),
            "ece_after": expected_calibration_error(after, labels)}


@dataclass
class OperatingPoint:
    """What a binary classifier flags: the positive label's probability >= threshold, chosen so
    that at most `target_fpr` of the legitimate messages in `chosen_on` were flagged."""

    positive: str
    threshold: float
    target_fpr: float
    chosen_on: str
    messages: int  # legitimate messages it was chosen on
    false_positive_rate: float  # measured there

    def to_dict(self) -> dict:
        return asdict(self)


def _checked(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(np.int64)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be two vectors of one length")
    if not set(np.unique(labels)) <= {0, 1}:
        raise ValueError("labels must be 0 (legitimate) or 1 (positive, spam)")
    return scores, labels
