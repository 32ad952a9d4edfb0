"""Calibration and the operating point of a trained classifier, from a prepared folder.

Temperature scaling is fitted on the validation split (Guo et al. 2017), so the probabilities
are calibrated for that split's mix of classes; `prior` shifts them to the positive class's share
of real traffic (Bayes' rule on the log-odds). For a binary classifier the threshold on the
positive class is the lowest that flags at most `target_fpr` of the legitimate messages in
`heldout_tune`; its false-positive rate is then measured on `heldout_test`, which took no part in
choosing it, on each path a scoring replica may compute with (its own probabilities: bf16 or int8
move a probability enough to push a legitimate message near the threshold over it).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.metrics import log_loss

from .calibration import Calibration, softmax
from .classifier import TextClassifier
from .onnx_graphs import ONNX_PATHS
from .onnx_graphs import export_problems as onnx_export_problems
from .operating_point import OperatingPoint, threshold_for_fpr
from .precision import BF16_CPU_FLAGS, PRECISIONS, cpu_flags
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


def calibrate(classifier: TextClassifier, data: str, target_fpr: float | None, prior: float | None = None,
              precisions: list[str] | None = None) -> dict:
    """Sets the classifier's calibration: its temperature (and its prior) and, for two labels with
    held-out data and a target, its operating point, with a threshold on each of `precisions`
    (`calibration_paths`); returns what was fitted and measured."""
    check_prior(prior, classifier.labels)
    binary = len(classifier.labels) == 2
    positive = read_positive_label(data) if binary else classifier.positive
    logits, labels = split_logits(classifier, data, "validation")
    temperature = fit_temperature(logits, labels)
    share = float(np.mean(labels == classifier.labels.index(positive))) if binary else None
    classifier.set_calibration(Calibration(positive, temperature, share, prior if binary else None))
    report = {"temperature": temperature, "validation": calibration_report(logits, labels, temperature)}
    logger.info(f"calibration: temperature {classifier.temperature:.3f} on the validation split (log loss "
                f"{report['validation']['log_loss_before']:.4f} -> {report['validation']['log_loss_after']:.4f}, ECE "
                f"{report['validation']['ece_before']:.4f} -> {report['validation']['ece_after']:.4f})")
    if binary:
        report.update(calibrated_share=share, prior=prior)
        logger.info(probabilities_meaning(classifier))
    if target_fpr is None or len(classifier.labels) != 2:
        return report
    if not (has_split(data, "heldout_tune") and has_split(data, "heldout_test")):
        logger.warning(f"{data} has no held-out legitimate messages (prepare it again with this spamray, balancing "
                       "on): no operating point, labels go to the most probable class")
        return report
    paths = calibration_paths(classifier, precisions or ["auto"])
    report.update(choose_operating_point(classifier, data, target_fpr,
                                         {path: at_precision(classifier, path) for path in paths}))
    return report


def calibration_paths(classifier: TextClassifier, requested: list[str]) -> list[str]:
    """The paths to choose a threshold on: fp32 always, and those `requested`. `auto` means those
    this machine scores with at speed: bf16 on a GPU or a CPU with bf16 units (a CPU without them
    emulates bf16 at about a sixth of fp32's speed, so choosing it there can cost more than
    training did), and each ONNX graph the classifier carries. Ask for bf16 by name to calibrate
    for a cluster of other CPUs."""
    import torch

    paths, problems = {"fp32"}, export_problems(classifier)
    for asked in requested:
        if asked != "auto":
            paths.add(asked)
            continue
        if torch.cuda.is_available() or set(BF16_CPU_FLAGS) & cpu_flags():
            paths.add("bf16")
        else:
            logger.info("calibration: no threshold at bf16 (this CPU has no bf16 units and would emulate it at about "
                        "a sixth of fp32's speed); `--precisions auto bf16` chooses one for machines that have them")
        paths.update(path for path, problem in problems.items() if problem is None)
    for path in paths & set(ONNX_PATHS):
        if problems[path]:
            raise ValueError(f"--precisions {path}: the classifier cannot score at {path}: {problems[path]}")
    return [path for path in PRECISIONS if path in paths]


def export_problems(classifier: TextClassifier) -> dict[str, str | None]:
    if classifier.saved_metadata is None:
        return {path: "it is not a saved classifier with ONNX graphs" for path in ONNX_PATHS}
    return onnx_export_problems(classifier.saved_metadata)


@dataclass
class PathRates:
    """A path's threshold, chosen on its probabilities of heldout_tune's legitimate messages, and
    what it flags of heldout_test's."""

    threshold: float
    chosen_rate: float  # on the heldout_tune messages it was chosen on
    flagged: np.ndarray  # heldout_test's legitimate messages it flags

    @property
    def measured_rate(self) -> float:
        return float(self.flagged.mean())


def path_rates(replica: TextClassifier, data: str, target_fpr: float) -> tuple[PathRates, int]:
    """`replica`'s rates on its own probabilities, and how many messages the threshold was chosen on."""
    positive = replica.labels.index(replica.positive)
    ham = replica.probabilities(legitimate_logits(replica, data, "heldout_tune"))[:, positive]
    threshold = threshold_for_fpr(ham, target_fpr)
    scores = replica.probabilities(legitimate_logits(replica, data, "heldout_test"))[:, positive]
    return PathRates(threshold, float((ham >= threshold).mean()), scores >= threshold), int(ham.size)


def choose_operating_point(classifier: TextClassifier, data: str, target_fpr: float,
                           replicas: dict[str, TextClassifier]) -> dict:
    """On each path of `replicas` (fp32's among them), the threshold on its own probabilities of
    heldout_tune's legitimate messages, and its rate on heldout_test's."""
    rates = {}
    for path, replica in replicas.items():
        rates[path], messages = path_rates(replica, data, target_fpr)
    fp32 = rates["fp32"]
    point = OperatingPoint(
        positive=classifier.positive, threshold=fp32.threshold, target_fpr=target_fpr, chosen_on="heldout_tune",
        messages=messages, false_positive_rate=fp32.chosen_rate,
        heldout_false_positive_rates={path: r.measured_rate for path, r in rates.items()},
        thresholds={path: r.threshold for path, r in rates.items()})
    classifier.set_calibration(replace(classifier.calibration, operating_point=point))
    return operating_point_report(point, rates)


def add_paths(classifier: TextClassifier, data: str, replicas: dict[str, TextClassifier]) -> dict:
    """Thresholds and held-out rates of more paths for an operating point chosen before (the
    export's ONNX graphs); the others stay as they are."""
    point = classifier.operating_point
    rates = {"fp32": path_rates(classifier, data, point.target_fpr)[0]}
    for path, replica in replicas.items():
        rates[path] = path_rates(replica, data, point.target_fpr)[0]
    added = [path for path in rates if path != "fp32"]
    point = replace(point, thresholds={**point.thresholds, **{path: rates[path].threshold for path in added}},
                    heldout_false_positive_rates={**point.heldout_false_positive_rates,
                                                  **{path: rates[path].measured_rate for path in added}})
    classifier.set_calibration(replace(classifier.calibration, operating_point=point))
    return operating_point_report(point, rates)


def operating_point_report(point: OperatingPoint, rates: dict[str, PathRates]) -> dict:
    fp32 = rates["fp32"]
    differ = {path: int((r.flagged != fp32.flagged).sum()) for path, r in rates.items() if path != "fp32"}
    messages = int(fp32.flagged.size)
    logger.info(f"operating point: {point.positive!r} when p >= {fp32.threshold:.4f}"
                + "".join(f" ({path}: {r.threshold:.4f})" for path, r in rates.items() if path != "fp32")
                + f", for a false-positive rate of at most {point.target_fpr:.2%} on {point.messages:,} held-out "
                f"legitimate messages; measured on {messages:,} others: "
                + ", ".join(f"{r.measured_rate:.2%} at {path}" for path, r in rates.items())
                + "".join(f" ({n} labelled differently at {path})" for path, n in differ.items()))
    return {"operating_point": point.to_dict(),
            "heldout_test": {"messages": messages, "false_positive_rate": fp32.measured_rate,
                             "false_positive_rate_by_precision": point.heldout_false_positive_rates,
                             "labels_differing_from_fp32": differ}}


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
