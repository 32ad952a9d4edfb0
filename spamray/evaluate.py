"""Judging a classifier on labelled messages: accuracy, per-class precision/recall/F1, confusion;
for a spam filter also ROC and precision-recall, recall at fixed false-positive rates, the
operating point's rates (on held-out legitimate messages too), and calibration."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from . import storage
from .classifier import TextClassifier
from .config import EvaluateConfig
from .operating_point import (REPORTED_FPRS, average_precision, calibration_report, precision_recall_curve, rates_at,
                              recall_at_fpr, roc_auc, roc_curve, softmax)
from .plots import plot_curve
from .prepare import SPLITS, has_split, read_labelled, split_url


def classification_report(true_ids: np.ndarray, predicted_ids: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, and the confusion matrix (rows: true)."""
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (true_ids, predicted_ids), 1)
    per_class = {}
    for i, label in enumerate(labels):
        true_positive = confusion[i, i]
        predicted, actual = confusion[:, i].sum(), confusion[i, :].sum()
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(actual)}
    return {"accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)), "per_class": per_class,
            "confusion_matrix": confusion.tolist(), "labels": labels, "count": int(confusion.sum())}


def predict_ids(classifier: TextClassifier, texts: list[str], argmax: bool = False) -> np.ndarray:
    was_training = classifier.training
    classifier.eval()
    try:
        probs = classifier.score_token_ids(classifier.encode(texts))
        return probs.argmax(axis=1) if argmax else classifier.label_ids(probs)
    finally:
        classifier.train(was_training)


def accuracy_by_split(classifier: TextClassifier, data: str) -> dict[str, float]:
    """Whole-split accuracy on each prepared split, labels by the most probable class (the book's
    final numbers, whatever the operating point)."""
    accuracies = {}
    for split in SPLITS:
        frame = pd.read_parquet(split_url(data, split), columns=["text", "label"])
        accuracies[f"{split}_accuracy"] = float((predict_ids(classifier, frame["text"].tolist(), argmax=True)
                                                 == frame["label"].to_numpy()).mean())
    return accuracies


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
    classifier = TextClassifier.load(cfg.model)
    data = cfg.data
    prepared = storage.exists(storage.join(data, "labels.json"))
    if prepared:
        data = split_url(data, cfg.split)
    if data.endswith(".parquet") and storage.exists(data) and "label_name" in pd.read_parquet(data).columns:
        frame = pd.read_parquet(data, columns=["text", "label_name"]).rename(columns={"label_name": "label"})
    else:
        frame = read_labelled(data, cfg.text_column, cfg.label_column)
    true_ids = label_ids(frame["label"], classifier.labels, data)
    logits = classifier.logits_token_ids(classifier.encode(frame["text"].tolist()))
    probs = softmax(logits, classifier.temperature)
    report = {"model": cfg.model, "data": data,
              **classification_report(true_ids, classifier.label_ids(probs), classifier.labels),
              "argmax_accuracy": float((probs.argmax(axis=1) == true_ids).mean()),
              "calibration": {"temperature": classifier.temperature,
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
    fpr, tpr, _ = roc_curve(scores, true_ids)
    precision, recall, _ = precision_recall_curve(scores, true_ids)
    pooled_scores, pooled_ids = scores, true_ids
    if heldout_ham is not None:
        pooled_scores = np.r_[scores, heldout_ham]
        pooled_ids = np.r_[true_ids, np.zeros(len(heldout_ham), dtype=true_ids.dtype)]
    report = {"positive": classifier.positive, "roc_auc": roc_auc(scores, true_ids),
              "average_precision": average_precision(scores, true_ids),
              "recall_at_false_positive_rate": {f"{target:g}": recall_at_fpr(pooled_scores, pooled_ids, target)
                                                for target in REPORTED_FPRS},
              "legitimate_messages_for_rates": int((pooled_ids == 0).sum()),
              "curves": {"roc": {"false_positive_rate": fpr.tolist(), "true_positive_rate": tpr.tolist()},
                         "precision_recall": {"precision": precision.tolist(), "recall": recall.tolist()}}}
    if classifier.operating_point:
        threshold = classifier.operating_point.threshold
        report["operating_point"] = classifier.operating_point.to_dict()
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
    return classifier.score_token_ids(classifier.encode(legitimate))[:, classifier.labels.index(classifier.positive)]


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
            lines.append(f"  heldout_test: false-positive rate {held['false_positive_rate']:.2%} "
                         f"({held['flagged']} of {held['messages']:,} legitimate messages)")
    lines.append(f"calibration (temperature {calibration['temperature']:.3f}): log loss {calibration['log_loss_before']:.4f}"
                 f" -> {calibration['log_loss_after']:.4f}, ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}")
    return lines


def format_report(report: dict) -> str:
    labels = report["labels"]
    lines = [f"{report['data']}: {report['count']} messages, accuracy {report['accuracy']:.2%}", "",
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
