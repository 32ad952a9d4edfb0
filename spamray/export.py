"""`spamray export`: a saved classifier's ONNX graphs, gated against torch before anything scores with them.

    graphs (spamray.onnx_graphs) --> the parity gate on the tune split, each graph against torch fp32
      --> a threshold on each graph that passed, on its own probabilities (as calibrate chooses them)
      --> the folder saved again: weights, graphs with their digests, spamray.json last

The gate: the fp32 graph's logits within FP32_LOGIT_TOLERANCE of torch's; the int8 graph's labels
at the operating point (each graph at its own threshold) equal to fp32's on at least
INT8_LABEL_AGREEMENT of the messages. A graph that fails is not kept, and its path is refused
with the figures measured.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .calibrate import add_paths, logits_of
from .classifier import TextClassifier
from .onnx_graphs import (GRAPH_FILES, OPSET, Gate, Graph, OnnxExports, OnnxLogits, export_graphs, runtime_versions,
                          sha256)
from .operating_point import threshold_for_fpr
from .prepare import has_split, split_url

logger = logging.getLogger(__name__)

FP32_LOGIT_TOLERANCE = 1e-4
INT8_LABEL_AGREEMENT = 0.995


@dataclass
class ExportReport:
    exports: OnnxExports
    seconds: float
    tune_split: str

    @property
    def refused(self) -> list[str]:
        return [path for path, graph in self.exports.graphs.items() if not graph.gate.passed]

    def describe(self) -> str:
        return (f"ONNX graphs made and gated on {self.tune_split} in {self.seconds:.0f} s: " + "; ".join(
            f"{path} {'kept' if graph.gate.passed else 'REFUSED'} ({graph.gate.figures()})"
            for path, graph in self.exports.graphs.items()))


def export(model: str, data: str, output: str | None = None) -> ExportReport:
    """Exports, gates and saves the graphs of the classifier at `model` into `output` (default: `model`)."""
    started = time.time()
    classifier = TextClassifier.load(model)
    graphs = export_graphs(classifier)
    tune = tune_messages(data, classifier.positive)
    reference = logits_of(classifier, tune.texts)
    exports = OnnxExports(weights_sha256=classifier.saved_metadata["weights"]["sha256"], versions=runtime_versions(),
                          opset=OPSET)
    replicas, files = {}, {}
    for path, graph in graphs.items():
        replica = with_graph(classifier, path, OnnxLogits(graph, torch.get_num_threads()))
        gate = parity_gate(classifier, reference, replica, logits_of(replica, tune.texts), tune)
        logger.info(f"export: {path} {'passed' if gate.passed else 'FAILED'} its parity gate on {tune.name}: "
                    f"{gate.figures()}" + (f" ({gate.why})" if gate.why else ""))
        exports.graphs[path] = Graph(GRAPH_FILES[path] if gate.passed else None,
                                     sha256(graph) if gate.passed else None, gate)
        if gate.passed:
            replicas[path], files[GRAPH_FILES[path]] = replica, graph
    if classifier.operating_point is not None and replicas:
        classifier.metrics = {**classifier.metrics, "export": add_paths(classifier, data, replicas)}
    classifier.exports = exports
    classifier.save(output or model, overwrite=True, extra_files=files)
    return ExportReport(exports, time.time() - started, tune.name)


@dataclass
class TuneMessages:
    """What the gate measures on: heldout_tune (legitimate messages, where thresholds are chosen)
    and the validation split (both classes), or validation alone where there is no heldout_tune."""

    name: str
    texts: list[str]
    legitimate: np.ndarray  # bool per message: not of the positive class


def tune_messages(data: str, positive: str | None) -> TuneMessages:
    splits = [split for split in ("heldout_tune", "validation") if has_split(data, split)]
    frame = pd.concat([pd.read_parquet(split_url(data, split), columns=["text", "label_name"]) for split in splits])
    return TuneMessages(" + ".join(splits), frame["text"].tolist(), (frame["label_name"] != positive).to_numpy())


def with_graph(classifier: TextClassifier, path: str, graph: OnnxLogits) -> TextClassifier:
    """The classifier scoring through `graph` (the same weights and settings; a shallow copy)."""
    replica = copy.copy(classifier)
    replica.onnx, replica.precision = graph, path
    return replica


def parity_gate(classifier: TextClassifier, reference: np.ndarray, replica: TextClassifier, logits: np.ndarray,
                tune: TuneMessages) -> Gate:
    """`replica`'s logits measured against torch fp32's (`reference`) on the tune messages."""
    max_diff = float(np.abs(logits - reference).max())
    agreement = float((labels_at_own_threshold(replica, logits, tune)
                       == labels_at_own_threshold(classifier, reference, tune)).mean())
    if replica.precision == "onnx-fp32" and not max_diff <= FP32_LOGIT_TOLERANCE:
        why = f"the fp32 graph's logits differ from torch's by {max_diff:.2e}, more than {FP32_LOGIT_TOLERANCE:.0e}"
    elif agreement < INT8_LABEL_AGREEMENT:
        why = f"labels equal to fp32's on {agreement:.2%} of messages, under {INT8_LABEL_AGREEMENT:.1%}"
    else:
        why = ""
    return Gate(not why, len(tune.texts), max_diff, agreement, why)


def labels_at_own_threshold(replica: TextClassifier, logits: np.ndarray, tune: TuneMessages) -> np.ndarray:
    """Labels as a replica of this path gives them: at the operating point's target, with a
    threshold chosen on its own probabilities of the legitimate tune messages (the most probable
    label where there is no operating point)."""
    probs = replica.probabilities(logits)
    point = replica.operating_point
    if point is None:
        return probs.argmax(axis=1)
    positive = replica.labels.index(point.positive)
    return replica.label_ids(probs, threshold_for_fpr(probs[tune.legitimate, positive], point.target_fpr))
