"""Judging a classifier on labelled messages: accuracy, per-class precision/recall/F1, confusion;
for a spam filter also ROC and precision-recall, recall at fixed false-positive rates, the
operating point's rates (on held-out legitimate messages too), and calibration."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from sklearn.metrics import (average_precision_score, confusion_matrix, precision_recall_curve,
                             precision_recall_fscore_support, roc_auc_score, roc_curve)

from . import storage
from .calibrate import at_precision, calibration_report, logits_of, probabilities_meaning
from .classifier import TextClassifier
from .config import EvaluateConfig
from .operating_point import REPORTED_FPRS, rates_at, recall_at_fpr
from .plots import plot_curve
from .prepare import SPLITS, has_split, read_labelled, split_url


def classification_report(true_ids: np.ndarray, predicted_ids: np.ndarray, labels: list[str]) -> dict:
    """Per-class precision/recall/F1/support and the confusion matrix (rows: true), scikit-learn's."""
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(true_ids, predicted_ids, labels=ids,
                                                                     zero_division=0)
    per_class = {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                         "support": int(support[i])} for i, label in enumerate(labels)}
    confusion = confusion_matrix(true_ids, predicted_ids, labels=ids)
    return {"per_class": per_class, "confusion_matrix": confusion.tolist(), "labels": labels,
            "count": int(confusion.sum())}


def accuracies(classifier: TextClassifier, probs: np.ndarray, true_ids: np.ndarray) -> dict[str, float | None]:
    """The two accuracies, kept apart: `argmax_accuracy` labels by the most probable class (the
    book's measure), `accuracy_at_threshold` by the operating point (what scoring labels; None
    without one)."""
    at_threshold = classifier.label_ids(probs) if classifier.operating_point else None
    return {"argmax_accuracy": float((probs.argmax(axis=1) == true_ids).mean()),
            "accuracy_at_threshold": None if at_threshold is None else float((at_threshold == true_ids).mean())}


def accuracy_by_split(classifier: TextClassifier, data: str) -> dict[str, float]:
    """Both accuracies on each prepared split: `test_argmax_accuracy` (the book's final numbers),
    `test_accuracy_at_threshold` (with an operating point), and so on."""
    figures = {}
    for split in SPLITS:
        frame = pd.read_parquet(split_url(data, split), columns=["text", "label"])
        probs = classifier.probabilities(logits_of(classifier, frame["text"].tolist()))
        for name, value in accuracies(classifier, probs, frame["label"].to_numpy()).items():
            if value is not None:
                figures[f"{split}_{name}"] = value
    return figures


def label_ids(values: pd.Series, labels: list[str], where: str) -> np.ndarray:
    """Labels given as names (or ham/spam for the default names) or as ids -> ids."""
    aliases = {label: i for i, label in enumerate(labels)}
    if labels == ["not spam", "spam"]:
        aliases.update({"ham": 0, "spam": 1})
    aliases.update({str(i): i for i in range(len(labels))})
    mapped = values.astype(str).map(aliases)
    unknown = mapped.isna()
    if unknown.any():
        rows = (np.flatnonzero(unknown.to_numpy()) + 1)[:10].tolist()
        raise ValueError(f"{where}: labels {sorted(set(values[unknown].astype(str)))[:5]} (rows {rows}) are not "
                         f"among the model's labels {labels}")
    return mapped.astype("int64").to_numpy()


def evaluate(cfg: EvaluateConfig) -> dict:
    """The classifier on labelled messages, computed at `cfg.precision` as a scoring replica
    at that precision computes it."""
    saved_classifier = TextClassifier.load(cfg.model)
    classifier = at_precision(saved_classifier, cfg.precision)
    data = cfg.data
    prepared = storage.exists(storage.join(data, "labels.json"))
    if prepared:
        data = split_url(data, cfg.split)
    if data.endswith(".parquet") and storage.exists(data) and "label_name" in pd.read_parquet(data).columns:
        frame = pd.read_parquet(data, columns=["text", "label_name"]).rename(columns={"label_name": "label"})
    else:
        frame = read_labelled(data, cfg.text_column, cfg.label_column, cfg.quoted_tsv)
    true_ids = label_ids(frame["label"], classifier.labels, data)
    logits = logits_of(classifier, frame["text"].tolist())
    probs = classifier.probabilities(logits)
    report = {"model": cfg.model, "data": data, "precision": cfg.precision, **accuracies(classifier, probs, true_ids),
              **classification_report(true_ids, classifier.label_ids(probs), classifier.labels),
              "probabilities": probabilities_meaning(classifier),
              "calibration": {"temperature": classifier.temperature, "calibrated_share": classifier.calibrated_share,
                              "prior": classifier.prior,
                              **calibration_report(logits, true_ids, classifier.temperature)}}
    if len(classifier.labels) == 2 and len(set(true_ids.tolist())) == 2:
        heldout = heldout_ham_scores(classifier, cfg.data) if prepared and has_split(cfg.data, "heldout_test") else None
        positive = classifier.labels.index(classifier.positive)
        report["binary"] = binary_report(classifier, probs[:, positive], (true_ids == positive).astype("int64"), heldout)
        if cfg.output:
            write_curves(report, cfg.output)
    return report


def binary_report(classifier: TextClassifier, scores: np.ndarray, true_ids: np.ndarray,
                  heldout_ham: np.ndarray | None = None) -> dict:
    """How a spam filter is judged (`scores`: the positive class's probability; `true_ids`: 1 for
    the positive class, 0 for the others): both AUCs, recall at fixed false-positive rates, and the rates
    at the classifier's operating point; the curves' points for plots and JSON. With held-out
    legitimate messages, the false-positive rates count them too: a few hundred test messages
    cannot tell 0.1% from 0.5%."""
    fpr, tpr, _ = roc_curve(true_ids, scores)
    precision, recall, _ = precision_recall_curve(true_ids, scores)
    pooled_scores, pooled_ids = scores, true_ids
    if heldout_ham is not None:
        pooled_scores = np.r_[scores, heldout_ham]
        pooled_ids = np.r_[true_ids, np.zeros(len(heldout_ham), dtype=true_ids.dtype)]
    report = {"positive": classifier.positive, "roc_auc": float(roc_auc_score(true_ids, scores)),
              "average_precision": float(average_precision_score(true_ids, scores)),
              "recall_at_false_positive_rate": {f"{target:g}": recall_at_fpr(pooled_scores, pooled_ids, target)
                                                for target in REPORTED_FPRS},
              "legitimate_messages_for_rates": int((pooled_ids == 0).sum()),
              "curves": {"roc": {"false_positive_rate": fpr.tolist(), "true_positive_rate": tpr.tolist()},
                         "precision_recall": {"precision": precision.tolist(), "recall": recall.tolist()}}}
    if classifier.operating_point:
        threshold = classifier.operating_point.threshold_at(classifier.precision)
        report["operating_point"] = {**classifier.operating_point.to_dict(), "threshold": threshold}
        report["at_operating_point"] = rates_at(threshold, scores, true_ids)
        if heldout_ham is not None:
            flagged = int((heldout_ham >= threshold).sum())
            report["heldout_test"] = {"messages": len(heldout_ham), "flagged": flagged,
                                      "false_positive_rate": flagged / max(len(heldout_ham), 1)}
    return report


def heldout_ham_scores(classifier: TextClassifier, data: str) -> np.ndarray:
    """The positive-class probability of the held-out legitimate messages that took no part in
    choosing the operating point (heldout_test)."""
    frame = pd.read_parquet(split_url(data, "heldout_test"), columns=["text", "label_name"])
    legitimate = frame[frame["label_name"] != classifier.positive]["text"].tolist()
    return classifier.probabilities(logits_of(classifier, legitimate))[:, classifier.labels.index(classifier.positive)]


def write_curves(report: dict, output: str) -> None:
    """roc.png and precision_recall.png (the operating point marked) and evaluation.json."""
    binary = report["binary"]
    at = binary.get("at_operating_point")
    roc, pr = binary["curves"]["roc"], binary["curves"]["precision_recall"]
    files = {
        "roc.png": plot_curve(np.array(roc["false_positive_rate"]), np.array(roc["true_positive_rate"]),
                              "false-positive rate", "true-positive rate (recall)",
                              f"ROC, AUC {binary['roc_auc']:.4f}",
                              (at["false_positive_rate"], at["recall"]) if at else None),
        "precision_recall.png": plot_curve(np.array(pr["recall"]), np.array(pr["precision"]), "recall", "precision",
                                           f"precision-recall, AP {binary['average_precision']:.4f}",
                                           (at["recall"], at["precision"]) if at else None),
        "evaluation.json": json.dumps(report, indent=2).encode(),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(output, name), data)


def format_binary(report: dict) -> list[str]:
    binary, calibration = report["binary"], report["calibration"]
    lines = ["", f"ROC AUC {binary['roc_auc']:.4f}, average precision {binary['average_precision']:.4f}"]
    recalls = binary["recall_at_false_positive_rate"]
    lines.append(f"{binary['positive']} recall at a false-positive rate of " + " / ".join(f"{float(k):.1%}" for k in recalls)
                 + ": " + " / ".join(f"{v:.2%}" for v in recalls.values())
                 + f" (rates over {binary['legitimate_messages_for_rates']:,} legitimate messages)")
    if "operating_point" in binary:
        point, at = binary["operating_point"], binary["at_operating_point"]
        lines.append(f"operating point: {point['positive']!r} when p >= {point['threshold']:.4f} (target false-positive "
                     f"rate {point['target_fpr']:.2%}, chosen on {point['messages']:,} messages of {point['chosen_on']})")
        lines.append(f"  here: false-positive rate {at['false_positive_rate']:.2%} ({at['flagged_ham']} of {at['ham']}), "
                     f"recall {at['recall']:.2%}, precision {at['precision']:.2%}")
        if "heldout_test" in binary:
            held = binary["heldout_test"]
            lines.append(f"  heldout_test: false-positive rate {held['false_positive_rate']:.2%} at {report['precision']} "
                         f"({held['flagged']} of {held['messages']:,} legitimate messages)")
    lines.append(f"calibration (temperature {calibration['temperature']:.3f}): log loss {calibration['log_loss_before']:.4f}"
                 f" -> {calibration['log_loss_after']:.4f}, ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}")
    lines.append(report["probabilities"])
    return lines


def format_report(report: dict) -> str:
    labels = report["labels"]
    at_threshold = report["accuracy_at_threshold"]
    lines = [f"{report['data']}: {report['count']} messages at {report['precision']}; accuracy {report['argmax_accuracy']:.2%} "
             "by the most probable label (argmax_accuracy)"
             + (f", {at_threshold:.2%} at the operating point (accuracy_at_threshold)" if at_threshold is not None else ""),
             "",
             f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for label, scores in report["per_class"].items():
        lines.append(f"{label:<14}{scores['precision']:>10.4f}{scores['recall']:>10.4f}{scores['f1']:>10.4f}{scores['support']:>10}")
    width = max(len(label) for label in labels) + 2
    lines += ["", "confusion matrix (rows: true, columns: predicted)", " " * width + "".join(f"{label:>{width}}" for label in labels)]
    for label, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"{label:<{width}}" + "".join(f"{count:>{width}}" for count in row))
    if "binary" in report:
        lines += format_binary(report)
    return "\n".join(lines)
