"""Calibration and the operating point of a trained classifier, from a prepared folder.

Temperature scaling is fitted on the validation split (Guo et al. 2017); for a binary
classifier the threshold on the positive class is the lowest that flags at most `target_fpr`
of the legitimate messages in `heldout_tune`, and its false-positive rate is then measured on
`heldout_test`, which took no part in choosing it.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .classifier import TextClassifier
from .operating_point import OperatingPoint, calibration_report, fit_temperature, softmax, threshold_for_fpr
from .prepare import has_split, read_positive_label, split_url

logger = logging.getLogger(__name__)


def split_logits(classifier: TextClassifier, data: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits, label ids) of a prepared split."""
    frame = pd.read_parquet(split_url(data, split), columns=["text", "label"])
    was_training = classifier.training
    classifier.eval()
    try:
        return classifier.logits_token_ids(classifier.encode(frame["text"].tolist())), frame["label"].to_numpy()
    finally:
        classifier.train(was_training)


def check_calibration_data(data: str, labels: list[str], target_fpr: float | None) -> None:
    """Before a long training run: an operating point asked for can be chosen on this data (its
    held-out split holds messages of the class the filter must not flag)."""
    if target_fpr is None or len(labels) != 2 or not has_split(data, "heldout_tune"):
        return
    positive = labels.index(read_positive_label(data))
    legitimate = int((pd.read_parquet(split_url(data, "heldout_tune"), columns=["label"])["label"] != positive).sum())
    if legitimate == 0:
        raise ValueError(f"{data}: heldout_tune holds no messages other than the positive class "
                         f"{labels[positive]!r}, so no threshold can bound their false-positive rate; prepare it "
                         "again with --positive-label naming the class to flag, or pass --target-fpr none")


def calibrate(classifier: TextClassifier, data: str, target_fpr: float | None) -> dict:
    """Sets `classifier.temperature` and, for two labels with held-out data and a target, its
    operating point; returns what was fitted and measured."""
    if len(classifier.labels) == 2:
        classifier.positive = read_positive_label(data)
    logits, labels = split_logits(classifier, data, "validation")
    classifier.temperature = fit_temperature(logits, labels)
    report = {"temperature": classifier.temperature,
              "validation": calibration_report(logits, labels, classifier.temperature)}
    logger.info(f"calibration: temperature {classifier.temperature:.3f} on the validation split (log loss "
                f"{report['validation']['log_loss_before']:.4f} -> {report['validation']['log_loss_after']:.4f}, ECE "
                f"{report['validation']['ece_before']:.4f} -> {report['validation']['ece_after']:.4f})")
    classifier.operating_point = None
    if target_fpr is None or len(classifier.labels) != 2:
        return report
    if not (has_split(data, "heldout_tune") and has_split(data, "heldout_test")):
        logger.warning(f"{data} has no held-out legitimate messages (prepare it again with this spamray, balancing "
                       "on): no operating point, labels go to the most probable class")
        return report
    positive = classifier.labels.index(classifier.positive)
    tune_logits, tune_labels = split_logits(classifier, data, "heldout_tune")
    ham = softmax(tune_logits, classifier.temperature)[tune_labels != positive, positive]
    threshold = threshold_for_fpr(ham, target_fpr)
    classifier.operating_point = OperatingPoint(
        positive=classifier.labels[positive], threshold=threshold, target_fpr=target_fpr, chosen_on="heldout_tune",
        messages=int(ham.size), false_positive_rate=float((ham >= threshold).mean()))
    test_logits, test_labels = split_logits(classifier, data, "heldout_test")
    measured = softmax(test_logits, classifier.temperature)[test_labels != positive, positive]
    report["operating_point"] = classifier.operating_point.to_dict()
    report["heldout_test"] = {"messages": int(measured.size), "false_positive_rate": float((measured >= threshold).mean())}
    logger.info(f"operating point: {classifier.labels[positive]!r} when p >= {threshold:.4f}, for a false-positive "
                f"rate of at most {target_fpr:.2%} on {ham.size:,} held-out legitimate messages; measured on "
                f"{measured.size:,} others: {report['heldout_test']['false_positive_rate']:.2%}")
    return report
