"""A spam filter's operating point: how much spam it catches at a fixed loss of legitimate mail.

Plain NumPy on scores (the positive class's probability, as the classifier computes it) and
true labels (1 = positive, spam). A message is flagged when its score is >= the threshold. The
curves and AUCs are scikit-learn's (spamray.evaluate); what no library does lives here: the
threshold that spends a false-positive budget, and the rates at it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def default_positive(labels) -> str | None:
    """Of two labels, 'spam' where it is one, else the second (a classifier's positive class
    until its prepared data names one); None for other label sets."""
    if len(labels) != 2:
        return None
    return "spam" if "spam" in labels else labels[1]


# Recall is reported at these false-positive rates (the TREC spam track reports such points).
REPORTED_FPRS = (0.001, 0.005, 0.01)


def threshold_for_fpr(ham_scores, target_fpr: float) -> float:
    """The lowest threshold that flags at most `target_fpr` of these legitimate messages: the
    filter catches the most spam the budget allows. (Flagged: score >= threshold.)

    The threshold is a value of the scores' own type (float32 from a classifier): a threshold
    between two float32 values would round onto one of them when compared with float32 scores,
    and flag a message it was chosen to pass."""
    ham = np.sort(np.asarray(ham_scores))[::-1]
    if ham.size == 0:
        raise ValueError("no legitimate messages to choose a threshold on")
    if not np.issubdtype(ham.dtype, np.floating):
        ham = ham.astype(np.float64)
    allowed = int(np.floor(target_fpr * ham.size + 1e-9))  # flagged ham the budget allows
    # Just above the (allowed+1)-th highest ham score: that one and all below it pass.
    return float(np.nextafter(ham[allowed], ham.dtype.type(np.inf))) if allowed < ham.size else float(ham[-1])


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


@dataclass
class OperatingPoint:
    """What a binary classifier flags: the positive label's probability >= threshold, chosen so
    that at most `target_fpr` of the legitimate messages in `chosen_on` were flagged.

    A threshold is chosen at each precision a scoring replica may run in (`thresholds`), on that
    precision's own probabilities: bf16 moves a probability by up to a few thousandths, enough to
    push a legitimate message near the threshold over it. `threshold` is fp32's.
    `heldout_false_positive_rates`: each precision's, at its own threshold, measured on messages
    that took no part in choosing it."""

    positive: str
    threshold: float
    target_fpr: float
    chosen_on: str
    messages: int  # legitimate messages it was chosen on
    false_positive_rate: float  # measured there, at fp32
    heldout_false_positive_rates: dict[str, float]
    thresholds: dict[str, float]  # precision -> its threshold, fp32's included

    def threshold_at(self, precision: str) -> float | None:
        """The threshold a replica computing in `precision` labels with; None where none was chosen."""
        return self.thresholds.get(precision)

    def to_dict(self) -> dict:
        return asdict(self)


def _checked(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores), np.asarray(labels).astype(np.int64)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be two vectors of one length")
    if not set(np.unique(labels)) <= {0, 1}:
        raise ValueError("labels must be 0 (legitimate) or 1 (positive, spam)")
    return scores, labels
