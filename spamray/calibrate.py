"""Calibration and the operating point of a trained classifier, from a prepared folder.

Temperature scaling is fitted on the validation split (Guo et al. 2017), so the probabilities
are calibrated for that split's mix of classes; `prior` shifts them to the positive class's share
of real traffic (Bayes' rule on the log-odds). For a binary classifier the threshold on the
positive class is the lowest that flags at most `target_fpr` of the legitimate messages in
`heldout_tune`; its false-positive rate is then measured on `heldout_test`, which took no part in
choosing it, at each precision a scoring replica may run in.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.metrics import log_loss

from .classifier import TextClassifier, softmax
from .operating_point import OperatingPoint, threshold_for_fpr
from .precision import PRECISIONS
from .prepare import has_split, read_positive_label, split_url

logger = logging.getLogger(__name__)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling: the T > 0 that minimises the log loss of softmax(logits / T) on
    held-out data. One parameter, so SciPy's bounded scalar search in log T finds it without a
    gradient; it never changes which class is most probable."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)

    def loss(log_t: float) -> float:
        return -float(np.mean(log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(labels)), labels]))

    found = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al. (2017): |accuracy - confidence| per confidence bin, weighted by the bin's share.
    (scikit-learn's calibration_curve bins one class's probability, not the top-label confidence.)"""
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


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """Log loss and expected calibration error of softmax(logits) and of softmax(logits / T)."""
    before, after = softmax(logits), softmax(logits, temperature)
    classes = list(range(before.shape[1]))
    return {"log_loss_before": float(log_loss(labels, before, labels=classes)),
            "log_loss_after": float(log_loss(labels, after, labels=classes)),
            "ece_before": expected_calibration_error(before, labels),
            "ece_after": expected_calibration_error(after, labels)}


def split_logits(classifier: TextClassifier, data: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits, label ids) of a prepared split."""
    frame = pd.read_parquet(split_url(data, split), columns=["text", "label"])
    return logits_of(classifier, frame["text"].tolist()), frame["label"].to_numpy()


def logits_of(classifier: TextClassifier, texts: list[str]) -> np.ndarray:
    """Class logits of texts, in eval mode whatever mode the classifier was in."""
    was_training = classifier.training
    classifier.eval()
    try:
        return classifier.logits_token_ids(classifier.encode(texts))
    finally:
        classifier.train(was_training)


def at_precision(classifier: TextClassifier, precision: str) -> TextClassifier:
    """The classifier as a scoring replica at `precision` runs it (a copy where it differs)."""
    if precision == classifier.precision:
        return classifier
    return copy.deepcopy(classifier).set_precision(precision)


def check_calibration_data(data: str, labels: list[str], target_fpr: float | None, prior: float | None = None) -> None:
    """Before a long training run: what calibration will be asked can be done on this data (its
    held-out split holds messages of the class the filter must not flag; a prior fits)."""
    check_prior(prior, labels)
    if target_fpr is None or len(labels) != 2 or not has_split(data, "heldout_tune"):
        return
    positive = labels.index(read_positive_label(data))
    legitimate = int((pd.read_parquet(split_url(data, "heldout_tune"), columns=["label"])["label"] != positive).sum())
    if legitimate == 0:
        raise ValueError(f"{data}: heldout_tune holds no messages other than the positive class "
                         f"{labels[positive]!r}, so no threshold can bound their false-positive rate; prepare it "
                         "again with --positive-label naming the class to flag, or pass --target-fpr none")


def check_prior(prior: float | None, labels: list[str]) -> None:
    if prior is None:
        return
    if len(labels) != 2:
        raise ValueError(f"--prior is the positive class's share of a two-label classifier's traffic; this one has "
                         f"{len(labels)} labels")
    if not 0.0 < prior < 1.0:
        raise ValueError(f"--prior {prior} must be a share strictly between 0 and 1 (for example 0.13)")


def calibrate(classifier: TextClassifier, data: str, target_fpr: float | None, prior: float | None = None) -> dict:
    """Sets `classifier.temperature` (and its prior) and, for two labels with held-out data and a
    target, its operating point; returns what was fitted and measured."""
    check_prior(prior, classifier.labels)
    if len(classifier.labels) == 2:
        classifier.positive = read_positive_label(data)
    logits, labels = split_logits(classifier, data, "validation")
    classifier.temperature = fit_temperature(logits, labels)
    report = {"temperature": classifier.temperature,
              "validation": calibration_report(logits, labels, classifier.temperature)}
    logger.info(f"calibration: temperature {classifier.temperature:.3f} on the validation split (log loss "
                f"{report['validation']['log_loss_before']:.4f} -> {report['validation']['log_loss_after']:.4f}, ECE "
                f"{report['validation']['ece_before']:.4f} -> {report['validation']['ece_after']:.4f})")
    classifier.calibrated_share, classifier.prior = None, None
    if len(classifier.labels) == 2:
        classifier.calibrated_share = float(np.mean(labels == classifier.labels.index(classifier.positive)))
        classifier.prior = prior
        report.update(calibrated_share=classifier.calibrated_share, prior=prior)
        logger.info(probabilities_meaning(classifier))
    classifier.operating_point = None
    if target_fpr is None or len(classifier.labels) != 2:
        return report
    if not (has_split(data, "heldout_tune") and has_split(data, "heldout_test")):
        logger.warning(f"{data} has no held-out legitimate messages (prepare it again with this spamray, balancing "
                       "on): no operating point, labels go to the most probable class")
        return report
    report.update(choose_operating_point(classifier, data, target_fpr))
    return report


def choose_operating_point(classifier: TextClassifier, data: str, target_fpr: float) -> dict:
    """At every precision a replica may score in, the threshold on that precision's probabilities
    of heldout_tune's legitimate messages, and its rate on heldout_test's."""
    positive = classifier.labels.index(classifier.positive)
    thresholds, chosen_rates, measured, flagged = {}, {}, {}, {}
    for precision in PRECISIONS:
        replica = at_precision(classifier, precision)
        ham = replica.probabilities(legitimate_logits(replica, data, "heldout_tune"))[:, positive]
        thresholds[precision] = threshold_for_fpr(ham, target_fpr)
        chosen_rates[precision] = float((ham >= thresholds[precision]).mean())
        scores = replica.probabilities(legitimate_logits(replica, data, "heldout_test"))[:, positive]
        flagged[precision] = scores >= thresholds[precision]
        measured[precision] = float(flagged[precision].mean())
    differ = int((flagged["fp32"] != flagged["bf16"]).sum())
    classifier.operating_point = OperatingPoint(
        positive=classifier.positive, threshold=thresholds["fp32"], target_fpr=target_fpr, chosen_on="heldout_tune",
        messages=int(ham.size), false_positive_rate=chosen_rates["fp32"], heldout_false_positive_rates=measured,
        thresholds=thresholds)
    messages = int(flagged["fp32"].size)
    logger.info(f"operating point: {classifier.positive!r} when p >= {thresholds['fp32']:.4f} (bf16: "
                f"{thresholds['bf16']:.4f}), for a false-positive rate of at most {target_fpr:.2%} on {ham.size:,} "
                f"held-out legitimate messages; measured on {messages:,} others: "
                + ", ".join(f"{rate:.2%} at {precision}" for precision, rate in measured.items())
                + f" ({differ} labelled differently at bf16)")
    return {"operating_point": classifier.operating_point.to_dict(),
            "heldout_test": {"messages": messages, "false_positive_rate": measured["fp32"],
                             "false_positive_rate_by_precision": measured, "labels_differing_at_bf16": differ}}


def legitimate_logits(classifier: TextClassifier, data: str, split: str) -> np.ndarray:
    frame = pd.read_parquet(split_url(data, split), columns=["text", "label_name"])
    return logits_of(classifier, frame.loc[frame["label_name"] != classifier.positive, "text"].tolist())


def probabilities_meaning(classifier: TextClassifier) -> str:
    """What a probability of the positive class means: the mix it is calibrated for."""
    share = classifier.calibrated_share
    if share is None:
        return "probabilities: not calibrated for a known mix of classes (calibrate with this spamray)"
    if classifier.prior is None:
        return (f"probabilities: calibrated for the validation split's mix, {share:.1%} {classifier.positive!r}; for "
                f"real traffic with another share, calibrate with --prior")
    return (f"probabilities: calibrated on the validation split ({share:.1%} {classifier.positive!r}) and shifted to "
            f"--prior {classifier.prior:.1%} {classifier.positive!r}")
