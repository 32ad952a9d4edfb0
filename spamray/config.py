"""Every job's settings as a typed dataclass with the book's defaults.

The CLI (`spamray <verb>`) builds its options from these fields and their `help`, and the
`jobs/` entrypoints go through that same CLI, so each setting is defined exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .precision import PRECISION_CHOICES, PRECISIONS, TRAINING_PRECISION_CHOICES


def option(default, help: str, **extra):
    """A dataclass field that carries its CLI help (and, optionally, choices or a short flag)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def required(help: str, **extra):
    return field(metadata={"help": help, "required": True, **extra})


def quoted_tsv_option():
    """TSV as most tools write it has no quoting: a line is a row and a quote is text."""
    return option(False, "read TSV files with CSV's double quotes (a quoted field may hold tabs and line breaks); "
                  "by default a TSV line is one row and a quote in it is text, as TSV is written")


@dataclass
class PrepareConfig:
    output: str = required("folder or URL for train/validation/test Parquet and labels.json")
    input: str = option("sms", "'sms' (the shipped SMS Spam Collection), 'uci' (download the UCI zip), "
                        "or a TSV/CSV/Parquet file at a path or fsspec URL")
    text_column: str = option("text", "column holding the message text (files with a header)")
    label_column: str = option("label", "column holding the label (files with a header)")
    quoted_tsv: bool = quoted_tsv_option()
    labels: str | None = option(None, "comma-separated label order; default: ham,spam as 'not spam','spam', "
                                "else the labels sorted")
    positive_label: str | None = option(None, "the class a binary classifier flags, whose false-positive rate "
                                        "the operating point bounds on the others (default: 'spam' where it is a "
                                        "label, else the class with fewer rows)")
    balance: str = option("undersample", "undersample each class to the smallest (the book) or none",
                          choices=["undersample", "none"])
    train_fraction: float = option(0.7, "share of rows for training")
    validation_fraction: float = option(0.1, "share of rows for validation; the rest is test")
    seed: int = option(123, "random_state for undersampling and shuffling (the book's 123)")
    skip_bad_rows: bool = option(False, "drop rows with empty text or an unknown label (each reported) "
                                 "instead of failing")
    overwrite: bool = option(False, "replace an existing output folder")

    def __post_init__(self):
        if not (0 < self.train_fraction and 0 <= self.validation_fraction
                and self.train_fraction + self.validation_fraction < 1):
            raise ValueError("need 0 < train_fraction, 0 <= validation_fraction and their sum below 1 (the rest is "
                             "test)")


@dataclass
class TrainConfig:
    data: str = required("prepared folder (from `spamray prepare`) or URL")
    output: str = required("folder or URL for the saved classifier, its metrics and plots")
    weights: str = option("gpt2", "gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded once from the Hugging Face "
                          "hub at a pinned commit, then read from its cache), a Hugging Face checkpoint "
                          "folder/URL, or 'random'")
    weights_revision: str | None = option(None, "hub commit to download a published --weights name at (default: "
                                          "the one spamray pins and verifies)")
    preset: str | None = option(None, "architecture for --weights random, or a check on a checkpoint "
                                "(gpt2-small/medium/large/xl, gpt2-mini, gpt2-tiny)")
    trainable: str = option("last_block", "head, last_block (the book), last_n_blocks:K, all, lora:RANK")
    pooling: str = option("last_token", "last_token (last non-padding token), last (last position, the "
                          "book; depends on padding), first (first token, exercise 6.3: with the causal mask it "
                          "sees only itself), mean (non-padding tokens)",
                          choices=["last_token", "last", "first", "mean"])
    padding: str = option("batch", "pad each batch to its longest message (batch), every batch to the longest "
                          "training message (longest, the book) or to --max-length / the context length (context, "
                          "exercise 6.1); only `last` pooling reads the padding, the others give the same "
                          "predictions under any padding", choices=["batch", "longest", "context"])
    causal_mask: bool = option(True, "attend causally, as GPT-2 was trained; --no-causal-mask lets every position "
                               "attend to the whole message (never to padding, so predictions stay independent of "
                               "it), one of the book's experiments; saved with the classifier")
    grad_accumulation: int = option(1, "add the gradients of this many batches before each optimizer step (the "
                                    "book's experiment: --batch-size 1 --grad-accumulation 8)")
    max_length: int | None = option(None, "truncate messages to this many tokens (default: the context length)")
    drop_rate: float = option(0.0, "dropout while fine-tuning")
    learning_rate: float = option(5e-5, "AdamW learning rate")
    weight_decay: float = option(0.1, "AdamW weight decay")
    epochs: int = option(5, "passes over the training split")
    batch_size: int = option(8, "messages per optimizer step on each worker")
    eval_freq: int = option(50, "evaluate train/validation loss every this many steps")
    eval_iter: int = option(5, "batches per loss/accuracy estimate during training")
    seed: int = option(123, "torch seed")
    precision: str = option("fp32", "compute of the training steps: fp32, bf16 (autocast: bf16 matrix products, fp32 "
                            "weights, optimizer and LayerNorms), or auto (bf16 on GPUs and on CPUs with bf16 matrix "
                            "units or instructions, fp32 elsewhere)", choices=list(TRAINING_PRECISION_CHOICES))
    num_workers: int = option(1, "Ray Train workers (one GPU each when --use-gpu)")
    use_gpu: bool | None = option(None, "one GPU per worker; default: when the cluster has GPUs")
    cpus_per_worker: int = option(2, "CPUs (and torch threads) per worker")
    storage_path: str | None = option(None, "where Ray Train keeps checkpoints; on more than one node a "
                                      "shared URL or NFS path (default: ~/ray_results)")
    shared_storage: bool = option(False, "the local --storage-path is a mount that every node shares (NFS): "
                                  "allow it on a cluster of several nodes")
    run_name: str | None = option(None, "Ray Train run name: start again with the same name and storage "
                                  "path to resume (default: derived from these settings)")
    max_failures: int = option(1, "worker failures to recover from (from the last checkpoint)")
    target_fpr: float | None = option(0.005, "after training, a binary classifier's threshold is chosen to flag at "
                                      "most this share of held-out legitimate messages (see `spamray calibrate`); "
                                      "none: no operating point, the most probable label wins")
    prior: float | None = option(None, "the positive class's share of the traffic the classifier will label (about 0.13 in the SMS collection; the balanced validation split is about half): probabilities are shifted from the validation mix to it; labels at the operating point do not change")
    data_timeout_s: float = option(600.0, "a worker waiting longer than this for its next batch fails, and is "
                                   "retried from the last checkpoint: a stalled data pipeline never hangs a run")
    overwrite: bool = option(False, "replace an existing output folder")

    def __post_init__(self):
        if self.grad_accumulation < 1:
            raise ValueError(f"--grad-accumulation {self.grad_accumulation}: give the number of batches per "
                             "optimizer step, 1 or more")


@dataclass
class EvaluateConfig:
    model: str = required("saved classifier folder or URL", positional=True)
    data: str = required("prepared split (Parquet), a prepared folder's split name is taken from --split, or "
                         "a labelled TSV/CSV/Parquet file", positional=True)
    split: str = option("test", "split to evaluate when DATA is a prepared folder")
    text_column: str = option("text", "text column of a labelled file")
    label_column: str = option("label", "label column of a labelled file (label names or ids)")
    quoted_tsv: bool = quoted_tsv_option()
    output: str | None = option(None, "folder for roc.png, precision_recall.png and evaluation.json (binary "
                                "classifiers)")
    precision: str = option("fp32", "compute as a scoring replica on this path does (score --precision), so the "
                            "rates measured are the ones it labels with", choices=list(PRECISIONS))


@dataclass
class CalibrateConfig:
    model: str = required("saved classifier folder or URL", positional=True)
    data: str = required("prepared folder: validation fits the temperature, heldout_tune the threshold, "
                         "heldout_test measures it", positional=True)
    target_fpr: float | None = option(0.005, "flag at most this share of legitimate messages (binary classifiers); "
                                      "none: no operating point")
    prior: float | None = option(None, "the positive class's share of the traffic the classifier will label (about 0.13 in the SMS collection; the balanced validation split is about half): probabilities are shifted from the validation mix to it; labels at the operating point do not change")
    precisions: list[str] = option(["auto"], "paths to choose a threshold on, each on its own probabilities (fp32 "
                                   "always): auto is those this machine scores with at speed (bf16 on GPUs and on "
                                   "CPUs with bf16 units; a CPU without them emulates bf16 at about a sixth of fp32's "
                                   "speed) and the ONNX graphs the classifier carries; name bf16 to calibrate for "
                                   "other machines", choices=list(PRECISION_CHOICES))
    output: str | None = option(None, "save the calibrated classifier here (default: replace MODEL)")


@dataclass
class ExportConfig:
    model: str = required("saved classifier folder or URL", positional=True)
    data: str = required("prepared folder: the parity gate and each graph's threshold use heldout_tune (and "
                         "validation), its held-out rate heldout_test", positional=True)
    output: str | None = option(None, "save the classifier with its graphs here (default: replace MODEL)")


@dataclass
class ClassifyConfig:
    model: str = required("saved classifier folder or URL", positional=True)
    texts: list[str] = required("messages to classify; '-' reads one message a line from stdin",
                                positional=True, nargs="+")


@dataclass
class ScoreConfig:
    model: str = required("saved classifier folder or URL")
    input: str = required("Parquet/CSV file, folder or glob, local or any fsspec URL")
    output: str = required("Delta Lake table for the predictions: a path or URL (s3://, gs://, az://, file://)")
    text_column: str = option("text", "column holding the message text")
    id_column: str | None = option(None, "column that identifies a message (carried through)")
    keep: list[str] = option([], "more input columns to carry into the output", nargs="*")
    quoted_tsv: bool = quoted_tsv_option()
    incremental: bool = option(False, "score only input files that are new or changed since the last run")
    overwrite: bool = option(False, "replace earlier output (non-incremental runs only)")
    replicas: int = option(1, "model replicas (actors); one GPU each when GPUs exist")
    cpus_per_replica: int = option(2, "CPUs per model replica, and the threads it computes on; on a small cluster "
                                   "a replica reserves fewer, leaving a CPU for reading and writing, and computes on "
                                   "as many threads as it reserved")
    batch_size: int | None = option(None, "rows per Ray Data batch sent to a replica (default: 1024 on CPUs, "
                                    "16384 on GPUs); a replica groups them by length, so larger batches pad less")
    precision: str = option("auto", "what the replicas compute with: torch fp32 or bf16, or ONNX Runtime running the "
                            "classifier's exported graph (`spamray export`) in fp32 or int8. auto is bf16 on GPUs; on "
                            "CPUs the fastest path the CPU and the classifier offer, in the order onnx-int8, bf16 "
                            "(CPUs with amx_bf16 or avx512_bf16), onnx-fp32, fp32, each only with a threshold "
                            "calibrated on its own probabilities (labels at the operating point stayed fp32's on at "
                            "least 99.5% of messages on every path, bench/score.py); the run's log and the table's "
                            "commit name the choice and why", choices=list(PRECISION_CHOICES))
    threshold: float | None = option(None, "label a binary classifier's positive class where its probability "
                                     "reaches this (default: the classifier's operating point, else the most "
                                     "probable label)")
    shadow: str | None = option(None, "a candidate classifier to try beside --model: the run scores every row with "
                                "both in one pass and writes the candidate's labels (at its own operating point) "
                                "beside the model in use's into --output, a shadow table of its own; the table in "
                                "use is not written. The candidate must have --model's labels, positive class and "
                                "token length")
    read_batch_rows: int = option(65536, "rows per block when reading a file")
    retention_hours: float = option(168.0, "after each commit, vacuum deletes the files that commits replaced once "
                                    "older than this (time travel reaches back this far); files no commit named "
                                    "go only with `spamray vacuum`")


    def __post_init__(self):
        if self.shadow is not None and self.threshold is not None:
            raise ValueError("--shadow with --threshold: a shadow run labels each model at its own operating point; "
                             "leave --threshold out")
        if self.shadow is not None and self.shadow.rstrip("/") == self.model.rstrip("/"):
            raise ValueError(f"--shadow {self.shadow} is --model itself: name the candidate to compare with it")


@dataclass
class VacuumConfig:
    output: str = required("the scores table (Delta Lake): a path or URL")
    retention_hours: float = option(168.0, "delete files that no table version names (killed runs', replaced ones) "
                                    "once older than this; at least 24, and longer than your longest scoring run, "
                                    "whose files are named only when it commits")


@dataclass
class ReportConfig:
    table: str = required("the scores table (Delta Lake): a path or URL", positional=True)
    out: str | None = option(None, "folder or URL for report.json, nights.png and scores.png (and report.html "
                             "with --html)")
    html: bool = option(False, "also write report.html: one static page with the table and the plots inline")
    since: str | None = option(None, "only runs committed at or after this ISO date or time (UTC unless it says)")
    last: int | None = option(None, "only the last N runs (after --since)")
    reference: str | None = option(None, "the run id drift is measured against (default: the table's first run)")
    max_psi: float | None = option(None, "exit 3 when a reported run's PSI against the reference exceeds this "
                                   "(0.25 is the usual line for a shift)")
    max_failed_files: int | None = option(None, "exit 3 when a reported run has more failed files than this")
    max_share_change: float | None = option(None, "exit 3 when a reported run's spam share differs from the "
                                            "reference's by more than this (0.05: five points)")

    def __post_init__(self):
        if self.last is not None and self.last < 1:
            raise ValueError(f"--last {self.last}: give a number of runs, at least 1")
        if self.html and self.out is None:
            raise ValueError("--html writes report.html into --out: give --out DIR")
        for name in ("max_psi", "max_failed_files", "max_share_change"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: a limit is not negative")


@dataclass
class DemoConfig:
    workdir: str = option("runs/demo", "folder for the prepared data, the model and the predictions")
    preset: str = option("gpt2-mini", "architecture trained from random weights (no download needed)")
    epochs: int = option(5, "passes over the training split")
    learning_rate: float = option(5e-4, "AdamW learning rate (higher than the book's: random weights)")
    num_workers: int = option(1, "Ray Train workers")
    precision: str = option("fp32", "training compute (train --precision): fp32, bf16 or auto",
                            choices=list(TRAINING_PRECISION_CHOICES))


@dataclass
class ServeConfig:
    model: str = required("saved classifier folder or URL, loaded once by each replica; in a Serve config file it "
                          "lives in the deployment's user_config, so that `serve deploy` of a new URL reloads the "
                          "replicas in place")
    replicas: int = option(1, "model replicas (Serve deployment replicas; one GPU each when GPUs exist)")
    autoscale: str | None = option(None, "MIN:MAX replicas, scaled by Serve on ongoing requests instead of a fixed "
                                   "--replicas")
    cpus_per_replica: int = option(2, "CPUs (and torch threads) per replica")
    use_gpu: bool | None = option(None, "one GPU per replica; default: when the cluster has GPUs (a --config-out "
                                  "file: none unless asked)")
    precision: str = option("auto", "what the replicas compute in, as for `spamray score --precision` (resolved on "
                            "each replica's own hardware)", choices=list(PRECISION_CHOICES))
    max_batch_size: int = option(256, "messages a replica scores in one model batch, gathered from concurrent "
                                 "requests (Serve's @serve.batch, counted in messages); at least --max-texts")
    batch_wait_ms: float = option(25.0, "how long a replica waits for more requests to join a batch once the first "
                                  "has arrived")
    max_texts: int = option(256, "messages one request may carry (more: 400)")
    max_body_bytes: int = option(1 << 20, "largest request body accepted (more: 413)")
    host: str = option("127.0.0.1", "address Serve's HTTP proxy binds: loopback unless you say otherwise (put the "
                       "cluster's ingress, with TLS, in front of anything else)")
    port: int = option(8000, "Serve's HTTP port")
    ingress: str = option("proxy", "what takes HTTP requests in on a local Ray: Serve's HTTP proxy, or HAProxy (Ray "
                          "Serve's HAProxy ingress: 2.7x the proxy's requests/s with one message each on 2 cores; "
                          "HAProxy also opens its stats and metrics ports, 8404 and 9101, on every interface). On a "
                          "cluster the ingress is the cluster's: start its nodes with RAY_SERVE_ENABLE_HA_PROXY=1",
                          choices=["proxy", "haproxy"])
    token_file: str | None = option(None, "file holding a bearer token: every route but /healthz then requires "
                                    "`Authorization: Bearer TOKEN` (default: the SPAMRAY_SERVE_TOKEN environment "
                                    "variable, where set)")
    config_out: str | None = option(None, "write the Serve config file (YAML, for `serve deploy`) for these "
                                    "options here, and deploy nothing")
    detach: bool = option(False, "on a cluster (RAY_ADDRESS): return once the application runs, leaving it "
                          "deployed (`serve shutdown` stops it); default: serve until interrupted, then delete it")

    def __post_init__(self):
        if self.autoscale:
            autoscale_bounds(self.autoscale)
            if self.replicas != 1:
                raise ValueError("--replicas and --autoscale both say how many replicas: give one of them")
        for name in ("replicas", "cpus_per_replica", "max_texts", "max_body_bytes", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.max_batch_size < self.max_texts:
            raise ValueError(f"--max-batch-size {self.max_batch_size} is less than --max-texts {self.max_texts}: a "
                             "full request would never fit in a batch")
        if self.batch_wait_ms < 0:
            raise ValueError(f"--batch-wait-ms must be 0 or more, not {self.batch_wait_ms}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a TCP port")


def autoscale_bounds(text: str) -> tuple[int, int]:
    """--autoscale MIN:MAX as two numbers."""
    low, sep, high = text.partition(":")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()) or not 0 <= int(low) <= int(high) or int(high) < 1:
        raise ValueError(f"--autoscale {text!r}: give MIN:MAX replicas, 0 <= MIN <= MAX and MAX >= 1 (say 1:4)")
    return int(low), int(high)
