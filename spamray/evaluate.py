"""Judging a classifier on labelled messages: accuracy, per-class precision/recall/F1, confusion."""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import storage
from .classifier import TextClassifier
from .config import EvaluateConfig
from .prepare import SPLITS, read_labelled, split_url


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


def predict_ids(classifier: TextClassifier, texts: list[str]) -> np.ndarray:
    was_training = classifier.training
    classifier.eval()
    try:
        return classifier.score_token_ids(classifier.encode(texts)).argmax(axis=1)
    finally:
        classifier.train(was_training)


def accuracy_by_split(classifier: TextClassifier, data: str) -> dict[str, float]:
    """Whole-split accuracy on each prepared split (the book's final numbers)."""
    accuracies = {}
    for split in SPLITS:
        frame = pd.read_parquet(split_url(data, split), columns=["text", "label"])
        accuracies[f"{split}_accuracy"] = float((predict_ids(classifier, frame["text"].tolist()) == frame["label"].to_numpy()).mean())
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
    if storage.exists(storage.join(data, "labels.json")):
        data = split_url(data, cfg.split)
    if data.endswith(".parquet") and storage.exists(data) and "label_name" in pd.read_parquet(data).columns:
        frame = pd.read_parquet(data, columns=["text", "label_name"]).rename(columns={"label_name": "label"})
    else:
        frame = read_labelled(data, cfg.text_column, cfg.label_column)
    true_ids = label_ids(frame["label"], classifier.labels, data)
    report = classification_report(true_ids, predict_ids(classifier, frame["text"].tolist()), classifier.labels)
    return {"model": cfg.model, "data": data, **report}


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
    return "\n".join(lines)
