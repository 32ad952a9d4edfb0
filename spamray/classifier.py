"""A GPT-2 whose language-model head is replaced by a small classification head (chapter 6).

`TextClassifier` owns the whole path from text to labels: tokenize, truncate, bucket by length,
pad each batch to its own longest row, run the model under inference mode, pool, softmax. The
Ray scoring replicas call the same `score_token_ids` that `predict` calls.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import saved
from .calibration import Calibration
from .lora import add_lora, merge_lora
from .model import GPTConfig, GPTModel
from .onnx_graphs import ONNX_PATHS, OnnxExports, OnnxLogits, load_graph
from .operating_point import OperatingPoint, default_positive
from .precision import PRECISIONS
from .tokenizer import get_tokenizer

POOLINGS = ("last_token", "last", "first", "mean")

# Tokens and rows per model batch. A CPU's matrix products run near full speed from a few hundred
# rows on, so small batches win there: rows grouped more tightly by length carry less padding
# (bench/score.py measured it). A GPU needs large batches to fill its cores.
CPU_BATCH_BUDGET = (512, 1024)
GPU_BATCH_BUDGET = (65536, 2048)
TRAINABLE_POLICIES = ("head", "last_block", "last_n_blocks:K", "all", "lora:RANK")


def probability_column(label: str) -> str:
    """`p_spam` for "spam", `p_not_spam` for "not spam": the scores column of each class."""
    return "p_" + re.sub(r"\W+", "_", label.strip().lower()).strip("_")


@dataclass(frozen=True)
class Prediction:
    label: str
    label_id: int
    probs: dict[str, float]


class TextClassifier(nn.Module):
    def __init__(self, gpt: GPTModel, labels: Sequence[str], pooling: str = "last_token", max_length: int | None = None,
                 causal: bool = True, pad_to: int | None = None):
        super().__init__()
        labels = [str(label) for label in labels]
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"a classifier needs at least two distinct labels, got {labels}")
        columns = [probability_column(label) for label in labels]
        clash = next((label for label, column in zip(labels, columns) if columns.count(column) > 1), None)
        if clash is not None:
            same = [label for label, column in zip(labels, columns) if column == probability_column(clash)]
            raise ValueError(f"labels {same} would share the output column {probability_column(clash)!r}; "
                             "rename one so that each label keeps its own probability column")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        max_length = max_length or gpt.cfg.context_length
        if not 1 <= max_length <= gpt.cfg.context_length:
            raise ValueError(f"max_length {max_length} must be between 1 and the context length {gpt.cfg.context_length}")
        if gpt.out_head.out_features != len(labels):
            gpt.out_head = nn.Linear(gpt.cfg.emb_dim, len(labels))
        self.gpt = gpt
        self.labels = labels
        self.pooling = pooling
        self.max_length = max_length
        # GPT-2 attends causally; False lets every position attend to the whole message (never
        # to padding), an experiment of the book's.
        self.causal = causal
        # `last` pooling reads the final padded position, so what it returns depends on the
        # padding: rows are padded to the length training padded them to, where it had one.
        if pad_to is not None and (pooling != "last" or pad_to != max_length):
            raise ValueError(f"pad_to {pad_to} applies to `last` pooling, and equals its max_length ({max_length})")
        self.pad_to = pad_to
        self.metrics: dict = {}
        self.trainable = "all"
        # Uncalibrated until `spamray calibrate` sets it: temperature 1, no operating point.
        self.calibration = Calibration(positive=default_positive(labels))
        self.precision = "fp32"
        self.onnx: OnnxLogits | None = None  # the ONNX Runtime session of an ONNX path
        # Where a loaded classifier came from, and the ONNX graphs its folder carries (spamray.onnx_graphs).
        self.source: str | None = None
        self.saved_metadata: dict | None = None
        self.exports: OnnxExports | None = None

    @classmethod
    def from_gpt2(cls, model: GPTModel, labels: Sequence[str], pooling: str = "last_token",
                  trainable: str = "last_block", max_length: int | None = None, causal: bool = True,
                  pad_to: int | None = None) -> "TextClassifier":
        """Takes over `model` (its LM head is replaced in place) and sets what will train."""
        classifier = cls(model, labels, pooling=pooling, max_length=max_length, causal=causal, pad_to=pad_to)
        classifier.set_trainable(trainable)
        return classifier

    @property
    def cfg(self) -> GPTConfig:
        return self.gpt.cfg

    def set_precision(self, precision: str, threads: int | None = None, shares_cores: bool = False) -> "TextClassifier":
        """The path it scores with (spamray.precision): fp32; bf16 for the transformer (half the
        memory traffic, tensor cores) while the final LayerNorm and the head stay fp32, so the logits,
        and the decision at a threshold, come out of fp32 arithmetic on the bf16 hidden states; or an
        ONNX graph its saved folder carries, run by ONNX Runtime on `threads` threads (torch's by
        default; `shares_cores` in a replica, see OnnxLogits). bf16 rounds the weights: going back to
        fp32 does not restore them (use a copy)."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.onnx = None
        if precision in ONNX_PATHS:
            if self.source is None:
                raise ValueError(f"{precision} runs the ONNX graph of a saved classifier: save it, run `spamray export "
                                 "MODEL DATA`, and load it again")
            self.onnx = load_graph(self.source, self.saved_metadata, precision, threads or torch.get_num_threads(),
                                   shares_cores)
        self.gpt.to(torch.bfloat16 if precision == "bf16" else torch.float32)
        self.gpt.final_norm.float()
        self.gpt.out_head.float()
        self.precision = precision
        return self

    # -- training policy ------------------------------------------------------------------
    def set_trainable(self, policy: str) -> None:
        """Freezes everything, then unfreezes what `policy` names (see TRAINABLE_POLICIES)."""
        kind, _, argument = policy.partition(":")
        gpt = self.gpt
        if kind == "all" and not argument:
            self.requires_grad_(True)
            self.trainable = policy
            return
        self.requires_grad_(False)
        gpt.out_head.requires_grad_(True)
        if kind == "head" and not argument:
            pass
        elif kind == "last_block" and not argument:
            gpt.trf_blocks[-1].requires_grad_(True)
            gpt.final_norm.requires_grad_(True)
        elif kind == "last_n_blocks" and argument.isdigit() and 1 <= int(argument) <= len(gpt.trf_blocks):
            for block in gpt.trf_blocks[-int(argument):]:
                block.requires_grad_(True)
            gpt.final_norm.requires_grad_(True)
        elif kind == "lora" and argument.isdigit() and int(argument) >= 1:
            add_lora(gpt.trf_blocks, rank=int(argument))  # new LoRA matrices are trainable
        else:
            raise ValueError(
                f"unknown trainable policy {policy!r}; choose one of {', '.join(TRAINABLE_POLICIES)} "
                f"(K from 1 to {len(gpt.trf_blocks)})"
            )
        self.trainable = policy

    # -- the forward pass -----------------------------------------------------------------
    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits [B, num_labels] of right-padded token ids [B, T] with true `lengths` [B]."""
        batch, tokens = token_ids.shape
        if lengths is None:
            lengths = torch.full((batch,), tokens, dtype=torch.long, device=token_ids.device)
        real = torch.arange(tokens, device=token_ids.device) < lengths[:, None]  # [B, T]: not padding
        attention = {"causal": self.causal, "key_mask": None if self.causal else real}
        if self.pooling == "mean":
            hidden = self.gpt.hidden_states(token_ids, **attention)
            mask = real.unsqueeze(-1)
            pooled = (hidden * mask).sum(dim=1) / lengths.clamp(min=1)[:, None].to(hidden.dtype)
        else:
            # `last` reads the final position, padding or not (the book); `last_token` the last
            # real token; `first` the first (exercise 6.3: causally it has seen only itself).
            positions = {"last": torch.full_like(lengths, tokens - 1), "last_token": lengths - 1,
                         "first": torch.zeros_like(lengths)}[self.pooling]
            pooled = self.gpt.hidden_states(token_ids, query_positions=positions, **attention)[:, 0]
        return self.gpt.out_head(pooled.to(self.gpt.out_head.weight.dtype))

    # -- scoring --------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids cut to `max_length`; an empty text is an error, since nothing can be classified."""
        batch = get_tokenizer().encode_batch(texts, max_length=self.max_length)
        for index, ids in enumerate(batch):
            if not ids:
                raise ValueError(f"text at index {index} is empty: there is nothing to classify")
        return batch

    @torch.inference_mode()
    def logits_token_ids(self, batch: Sequence[Sequence[int]], max_batch_tokens: int | None = None,
                         max_batch_rows: int | None = None) -> np.ndarray:
        """Class logits [N, num_labels] for token id lists (each 1..max_length long).

        Rows are grouped by length so each model batch pads only to its own longest row; the
        result comes back in input order. With `last_token` pooling no row's result depends on
        what else is in the batch. The budgets default to CPU_BATCH_BUDGET or GPU_BATCH_BUDGET.
        """
        if self.training:
            raise RuntimeError("call .eval() before scoring: dropout is on")
        device = next(self.parameters()).device
        default_tokens, default_rows = CPU_BATCH_BUDGET if device.type == "cpu" else GPU_BATCH_BUDGET
        max_batch_tokens, max_batch_rows = max_batch_tokens or default_tokens, max_batch_rows or default_rows
        logits = np.empty((len(batch), len(self.labels)), dtype=np.float32)
        for rows in length_buckets([len(ids) for ids in batch], max_batch_tokens, max_batch_rows):
            token_ids, lengths = pad_rows([batch[row] for row in rows], self.max_length, self.pad_to)
            if self.onnx is not None:
                logits[rows] = self.onnx(token_ids, lengths)
            else:
                logits[rows] = self(torch.from_numpy(token_ids).to(device),
                                    torch.from_numpy(lengths).to(device)).float().cpu().numpy()
        return logits

    def score_token_ids(self, batch: Sequence[Sequence[int]], max_batch_tokens: int | None = None,
                        max_batch_rows: int | None = None) -> np.ndarray:
        """Class probabilities [N, num_labels] of token id lists (see `probabilities`)."""
        return self.probabilities(self.logits_token_ids(batch, max_batch_tokens, max_batch_rows))

    # -- calibration (spamray.calibration) ---------------------------------------------------
    def set_calibration(self, calibration: Calibration) -> None:
        """Replaces the whole calibration at once (`spamray calibrate` makes it)."""
        calibration.check_labels(self.labels)
        self.calibration = calibration

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    @property
    def positive(self) -> str | None:
        return self.calibration.positive

    @property
    def operating_point(self) -> OperatingPoint | None:
        return self.calibration.operating_point

    @property
    def calibrated_share(self) -> float | None:
        return self.calibration.calibrated_share

    @property
    def prior(self) -> float | None:
        return self.calibration.prior

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (see Calibration.probabilities)."""
        return self.calibration.probabilities(logits, self.labels)

    def label_ids(self, probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Each row's label at this classifier's precision (see Calibration.label_ids)."""
        return self.calibration.label_ids(probs, self.labels, self.precision, threshold)

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Label and class probabilities for each text (texts longer than max_length are truncated)."""
        was_training = self.training
        self.eval()
        try:
            probs = self.score_token_ids(self.encode(texts))
        finally:
            self.train(was_training)
        return [self.prediction(row) for row in probs]

    def prediction(self, probs: np.ndarray) -> Prediction:
        label_id = int(self.label_ids(probs[None, :])[0])
        return Prediction(self.labels[label_id], label_id, dict(zip(self.labels, map(float, probs))))

    # -- saving ---------------------------------------------------------------------------
    def save(self, url: str, overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> None:
        """Writes the classifier folder (see spamray.saved); LoRA updates are merged first. The ONNX
        graphs a loaded classifier carries go along (a graph of other weights is refused on load)."""
        merge_lora(self.gpt)
        extra_files = {**self.carried_graphs(skip=set(extra_files or ())), **(extra_files or {})}
        metadata = {
            "model_config": self.cfg.to_dict(),
            "labels": self.labels,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "causal_mask": self.causal,
            "pad_to": self.pad_to,
            "trainable": self.trainable,
            "metrics": self.metrics,
            **self.calibration.to_metadata(),
            "onnx": self.exports.to_dict() if self.exports else None,
        }
        saved.write_saved(url, metadata, self.state_dict(), overwrite=overwrite, extra_files=extra_files)

    @classmethod
    def load(cls, url: str) -> "TextClassifier":
        metadata = saved.read_metadata(url)
        try:
            cfg = GPTConfig.from_dict(metadata["model_config"])
            with torch.device("meta"):
                skeleton = cls(GPTModel(cfg), metadata["labels"], metadata["pooling"], metadata["max_length"],
                               causal=metadata["causal_mask"], pad_to=metadata["pad_to"])
        except (KeyError, TypeError, ValueError) as error:
            raise saved.SavedClassifierError(f"{url}: {saved.METADATA_FILE} does not describe a valid classifier ({error})") from error
        expected = {name: (tuple(t.shape), t.dtype) for name, t in skeleton.state_dict().items()}
        metadata, tensors = saved.read_saved(url, expected)
        # The skeleton takes the loaded tensors as they are: no random initialisation to overwrite
        # (seconds for the larger models, paid by every scoring replica as it starts).
        classifier = skeleton
        classifier.load_state_dict(tensors, strict=True, assign=True)
        try:
            classifier.set_calibration(Calibration.from_metadata(metadata))
        except (KeyError, TypeError, ValueError) as error:
            raise saved.SavedClassifierError(f"{url}: {saved.METADATA_FILE} holds no valid calibration ({error})") from error
        try:
            classifier.metrics, classifier.trainable = metadata["metrics"], metadata["trainable"]
            classifier.exports = OnnxExports.from_dict(metadata["onnx"]) if metadata["onnx"] else None
        except (KeyError, TypeError, ValueError) as error:
            raise saved.SavedClassifierError(f"{url}: {saved.METADATA_FILE} does not describe a valid classifier ({error})") from error
        classifier.version = saved.model_version(metadata)
        classifier.source, classifier.saved_metadata = url, metadata
        return classifier.eval()

    def carried_graphs(self, skip: set[str]) -> dict[str, bytes]:
        """The ONNX graph files of the folder this classifier was loaded from, to save beside it
        (but those in `skip`, given anew)."""
        if self.exports is None:
            return {}
        files = [graph.file for graph in self.exports.graphs.values() if graph.file and graph.file not in skip]
        return {file: saved.read_file(self.source, file) for file in files}

    def fingerprint(self) -> str:
        """A short hash of the weights and settings: names the model version in outputs."""
        settings = [self.cfg.to_dict(), self.labels, self.pooling, self.max_length]
        if not self.causal or self.pad_to:
            settings += [self.causal, self.pad_to]
        digest = hashlib.sha256(json.dumps(settings).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


def length_buckets(lengths: Sequence[int], max_batch_tokens: int, max_batch_rows: int) -> Iterator[np.ndarray]:
    """Row indices grouped by similar length, each group padded size within the token budget."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    start = 0
    while start < len(order):
        end = start + 1
        # Sorted ascending, so the padded size of order[start:end+1] is (rows) x lengths[order[end]].
        while end < len(order) and end - start < max_batch_rows and (end - start + 1) * lengths[order[end]] <= max_batch_tokens:
            end += 1
        yield order[start:end]
        start = end


def pad_rows(rows: Sequence[Sequence[int]], max_length: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids and true lengths: to the longest row, or to `length`."""
    for ids in rows:
        if not 1 <= len(ids) <= max_length:
            raise ValueError(f"a row has {len(ids)} tokens; each must have 1 to {max_length} (encode() truncates)")
    return get_tokenizer().pad(rows, length=length)
