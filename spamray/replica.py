"""A model replica: tokenizing a batch of messages, and scoring it with the saved classifier. Batch
scoring runs it as Ray Data's actor pool (score.py), Serve as its deployment's model (serve.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from . import saved
from .classifier import probability_column
from .onnx_graphs import export_problems
from .precision import resolve_precision
from .tokenizer import get_tokenizer

# Rows a replica scores; the others (null, empty, undecodable) keep a null label.
SCOREABLE = ("ok", "truncated")
# A batch whose replica dies (a lost node, a crash) goes to a restarted replica. One that kills
# every replica it reaches (a crash in native code, out of memory on some message) would do so
# without end: Ray Data restarts replicas and retries their batches without limit. Once it has
# crashed this many times, the batch is refused: its input files fail, named with the rows, the
# others commit.
MAX_BATCH_CRASHES = 3


def tokenize_batch(batch: pa.Table, max_length: int, keep_text: bool) -> pa.Table:
    """Adds status (null, empty, undecodable, truncated, ok), n_tokens and token_ids."""
    texts = batch["text"].to_pylist()
    status = batch["status"].to_pylist()
    for row, text in enumerate(texts):
        if status[row] is None:
            status[row] = "null" if text is None else "empty" if not text.strip() else "ok"
    scoreable = [row for row, state in enumerate(status) if state == "ok"]
    encoded = get_tokenizer().encode_batch([texts[row] for row in scoreable])
    lengths = np.zeros(len(texts), dtype=np.int32)
    for row, ids in zip(scoreable, encoded):
        lengths[row] = len(ids)
        if len(ids) > max_length:
            status[row] = "truncated"
    kept = np.minimum(lengths, max_length)
    offsets = np.zeros(len(texts) + 1, dtype=np.int32)
    np.cumsum(kept, out=offsets[1:])
    flat = np.concatenate([np.asarray(ids[:max_length], dtype=np.int32) for ids in encoded]) if encoded else np.zeros(0, np.int32)
    table = batch if keep_text else batch.drop_columns(["text"])
    return (table.drop_columns(["status"])
            .append_column("status", pa.array(status, pa.string()))
            .append_column("n_tokens", pa.array(lengths))
            .append_column("token_ids", pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))))


class Scorer:
    """One model replica: loads the saved classifier once, then scores batches of token ids.

    It refuses a model whose version is not the run's (the model was overwritten while the run
    was starting replicas), and a batch that already crashed MAX_BATCH_CRASHES replicas (see there)."""

    def __init__(self, model_url: str, threads: int, model_name: str, precision: str = "auto",
                 model_version: str | None = None, batch_crashes=None, threshold: float | None = None,
                 in_use_url: str | None = None, in_use_version: str | None = None, in_use_precision: str = "auto"):
        import torch

        torch.set_num_threads(threads)
        self.classifier, self.precision = load_checked(model_url, model_version, precision, threads, threshold)
        # A shadow run's model in use: it scores the same token ids, at its own operating point,
        # for the rows to compare with the candidate's.
        self.in_use = (load_checked(in_use_url, in_use_version, in_use_precision, threads, None)[0]
                       if in_use_url else None)
        self.columns = [probability_column(label) for label in self.classifier.labels]
        self.model_name = model_name
        self.node = replica_node()
        self.batch_crashes = batch_crashes
        self.threshold = threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.batch_crashes is None:
            return self.score_batch(batch)
        import ray

        key = batch_key(batch)
        crashes = ray.get(self.batch_crashes.start.remote(key))
        if crashes >= MAX_BATCH_CRASHES:
            scored = self.output(batch, [], np.zeros((0, len(self.columns)), np.float32),
                                 file_errors=killer_batch_errors(batch, crashes=crashes))
        else:
            scored = self.score_batch(batch)
        ray.get(self.batch_crashes.finish.remote(key))  # recorded before the next batch can crash
        return scored

    def score_batch(self, batch: pa.Table) -> pa.Table:
        token_ids = batch["token_ids"].combine_chunks()
        offsets, flat = token_ids.offsets.to_numpy(), token_ids.values.to_numpy()
        scoreable = np.flatnonzero(np.isin(batch["status"].to_numpy(zero_copy_only=False), SCOREABLE))
        sequences = [flat[offsets[row]:offsets[row + 1]] for row in scoreable]
        probs = self.classifier.score_token_ids(sequences)
        in_use_probs = self.in_use.score_token_ids(sequences) if self.in_use is not None else None
        return self.output(batch, scoreable, probs, in_use_probs=in_use_probs)

    def output(self, batch: pa.Table, scoreable, probs: np.ndarray, file_errors: pa.Array | None = None,
               in_use_probs: np.ndarray | None = None) -> pa.Table:
        """The batch with its predictions: label, label_id and a probability per label, null
        where a row was not scored; in a shadow run also the model in use's label and positive
        class probability."""
        mask = np.ones(batch.num_rows, dtype=bool)
        mask[scoreable] = False
        out = batch.drop_columns(["token_ids"])
        if file_errors is not None:
            out = out.set_column(out.schema.get_field_index("file_error"), "file_error", file_errors)
        labels, label_ids, full = self.labelled(self.classifier, batch.num_rows, scoreable, probs, self.threshold)
        out = out.append_column("label", pa.array(labels, pa.string(), mask=mask))
        out = out.append_column("label_id", pa.array(label_ids, mask=mask))
        for column, values in zip(self.columns, full.T):
            out = out.append_column(column, pa.array(values, mask=mask))
        if self.in_use is not None:
            in_use_probs = in_use_probs if in_use_probs is not None else probs[:0]
            labels, _, full = self.labelled(self.in_use, batch.num_rows, scoreable, in_use_probs, None)
            positive = self.in_use.labels.index(self.in_use.positive)
            out = out.append_column("in_use_label", pa.array(labels, pa.string(), mask=mask))
            out = out.append_column(in_use_probability_column(self.in_use.positive), pa.array(full[:, positive], mask=mask))
        now = datetime.now(timezone.utc)
        return (out.append_column("model", pa.array([self.model_name] * batch.num_rows, pa.string()))
                .append_column("scored_at", pa.array([now] * batch.num_rows, pa.timestamp("us", tz="UTC")))
                .append_column("replica_node", pa.array([self.node] * batch.num_rows, pa.string())))

    @staticmethod
    def labelled(classifier, rows: int, scoreable, probs: np.ndarray, threshold: float | None):
        """Every row's label, label id and probabilities (zeros where not scored)."""
        full = np.zeros((rows, len(classifier.labels)), dtype=np.float32)
        full[scoreable] = probs
        label_ids = np.zeros(rows, dtype=np.int64)
        label_ids[scoreable] = classifier.label_ids(probs, threshold) if len(probs) else 0
        return np.asarray(classifier.labels, dtype=object)[label_ids], label_ids, full


def in_use_probability_column(positive: str) -> str:
    """A shadow table's probability of the positive class under the model in use."""
    return "in_use_" + probability_column(positive)


def load_checked(model_url: str, model_version: str | None, precision: str, threads: int, threshold: float | None):
    """The saved classifier, refused where its version is not the run's (it was overwritten while
    the run was starting replicas), set to compute on `precision` on this replica's hardware;
    and that precision choice."""
    import torch

    from .classifier import TextClassifier

    classifier = TextClassifier.load(model_url)
    if model_version is not None and classifier.version != model_version:
        raise saved.SavedClassifierError(
            f"{model_url} changed while this run was starting: the run recorded model version {model_version}, "
            f"a replica loaded {classifier.version}. A run scores every row with one model version; "
            "run it again to score with the new model")
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        classifier.cuda()
    point = classifier.operating_point if threshold is None else None  # (a given threshold replaces it)
    choice = resolve_precision(precision, on_gpu, operating_point=point and point.to_dict(),
                               threshold_given=threshold is not None, exports=export_problems(classifier.saved_metadata))
    classifier.set_precision(choice.precision, threads, shares_cores=True)
    return classifier, choice


def batch_key(batch: pa.Table) -> str:
    """Names a batch by its first and last rows: a retried batch holds the same rows."""
    files, rows = batch["source_file"], batch["source_row"]
    return f"{files[0]}:{rows[0]}:{files[-1]}:{rows[-1]}:{batch.num_rows}"


def killer_batch_errors(batch: pa.Table, crashes: int) -> pa.Array:
    """`file_error` for each row of a batch that killed its replica every time: the input
    file and the rows of it in the batch, so that a person can find the messages."""
    spans: dict[str, tuple[int, int]] = {}
    for file, row in zip(batch["source_file"].to_pylist(), batch["source_row"].to_pylist()):
        first, last = spans.get(file, (row, row))
        spans[file] = (min(first, row), max(last, row))
    errors = {file: f"rows {first}-{last} killed the model replica scoring them {crashes} times (a crash in native "
                    "code, or out of memory): look at those messages; nothing of this file is committed"
              for file, (first, last) in spans.items()}
    return pa.array([errors[file] for file in batch["source_file"].to_pylist()], pa.string())


def replica_node() -> str:
    """The Ray node this process runs on ("local" outside Ray): the run summary names them."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def replica_cpu_reservation(replicas: int, cpus_per_replica: int, cluster_cpus: float) -> float:
    """CPUs each replica reserves: its share, but never so many that the read and write tasks
    find no CPU left (they would wait for the replicas, which wait for them)."""
    share = (cluster_cpus - 1) / replicas
    return float(min(cpus_per_replica, share)) if share >= 0.5 else 0.5


def replica_threads(reserved_cpus: float) -> int:
    """Threads a replica computes on: the CPUs it reserved (at least one). More would contend
    with the read, tokenize and write tasks and Ray's own processes for the same cores; on a
    2-core node two threads for one reserved CPU were each busy only 62% of a night, waiting at
    every parallel region for the one the other work had pre-empted (bench/replica_cpu.py)."""
    return max(1, int(reserved_cpus))
