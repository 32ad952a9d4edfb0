"""What a scoring run settles before any Ray work: the classifier (and a shadow run's model in
use), the files to score, the output's columns, the precision; and the summary the run fills in."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from . import saved, storage
from .classifier import probability_column
from .config import ScoreConfig
from .errors import store_step
from .inputs import InputFile, check_inputs, list_input_files
from .onnx_graphs import export_problems
from .operating_point import OperatingPoint
from .precision import PrecisionChoice, cluster_precision
from .replica import in_use_probability_column
from .scores_layout import IDENTITY, PARTITIONS, TableState, plan_inputs, table_schema
from .scores_table import ScoresTable

logger = logging.getLogger(__name__)
# Columns that travel through the pipeline but are not output.
INTERNAL_COLUMNS = {"token_ids", "file_error", "replica_node"}
# The CPU share each read, tokenize and write task asks for: small enough to fit beside a replica
# on any node. With whole CPUs, two replicas on two 1-CPU nodes left half a CPU on each and no
# task could start anywhere: the tasks waited for CPUs the replicas held, the replicas for rows.
TASK_CPUS = 0.25


def output_schema(carried: dict[str, pa.DataType], keep_text: bool, labels: list[str],
                  shadow_of: str | None = None) -> pa.Schema:
    """The scores columns of the data files (the table adds the identity and partition columns,
    see scores_table); in a shadow run (`shadow_of`: the positive class) also the model in use's
    label and positive-class probability."""
    fields = [pa.field(name, kind) for name, kind in carried.items() if name != "text"]
    if keep_text:
        fields.append(pa.field("text", pa.string()))
    fields += [pa.field("source_row", pa.int64()), pa.field("status", pa.string()), pa.field("n_tokens", pa.int32()),
               pa.field("label", pa.string()), pa.field("label_id", pa.int64())]
    fields += [pa.field(probability_column(label), pa.float32()) for label in labels]
    if shadow_of is not None:
        fields += [pa.field("in_use_label", pa.string()), pa.field(in_use_probability_column(shadow_of), pa.float32())]
    return pa.schema(fields + [pa.field("model", pa.string()), pa.field("scored_at", pa.timestamp("us", tz="UTC"))])


def check_output_names(carried: list[str], labels: list[str], shadow_of: str | None = None) -> None:
    """An input column carried into the output must not take the name of one the output writes."""
    taken = set(output_schema({}, False, labels, shadow_of).names) | set(IDENTITY) | set(PARTITIONS) | INTERNAL_COLUMNS
    for column in carried:
        if column in taken:
            raise ValueError(f"--keep/--id-column {column!r}: the scores output writes a column of that name itself; "
                             "rename the input column, or leave it out")


@dataclass
class ScoreSummary:
    """What a scoring run did, as `score` returns it and the CLI prints it."""

    run_id: str
    output: str
    table_version: int | None  # the version holding this run's rows (None: no table yet)
    files_seen: int
    threshold: float | None
    files_failed: dict[str, str]  # input -> why (nothing of it committed; the next run tries again)
    files_skipped: list[dict]  # {url, reason}: not data files
    files_scored: int = 0
    files_already_scored: int = 0  # committed meanwhile by another run with the same model
    rows_read: int = 0
    rows_written: int = 0
    rows_per_status: dict[str, int] = field(default_factory=dict)
    rows_per_label: dict[str, int] = field(default_factory=dict)
    data_files_added: int = 0
    data_files_removed: int = 0
    bytes_written: int = 0
    replica_nodes: list[str] = field(default_factory=list)
    precision: str | None = None
    seconds: float = 0.0
    rows_per_second: float = 0.0


def format_summary(summary: ScoreSummary) -> str:
    statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(summary.rows_per_status.items()))
    labels = ", ".join(f"{k} {v:,}" for k, v in sorted(summary.rows_per_label.items()) if k != "None")
    failed = f"; {len(summary.files_failed)} FAILED" if summary.files_failed else ""
    skipped = f"; {len(summary.files_skipped)} skipped" if summary.files_skipped else ""
    nodes = f"; replicas on node(s) {', '.join(n[:12] for n in summary.replica_nodes)}" if summary.replica_nodes else ""
    return (f"scored {summary.files_scored} of {summary.files_seen} files{failed}{skipped}{nodes}: "
            f"{summary.rows_written:,} rows committed ({statuses or 'none'}); predicted {labels or 'nothing'}; "
            f"{summary.rows_per_second:,.0f} rows/s; table {summary.output} at version {summary.table_version}")


def read_classifier(model: str) -> dict:
    """The saved classifier's metadata, once its weights are known to be there."""
    with store_step(f"reading the classifier {model}"):
        metadata = saved.read_metadata(model)
        if not storage.exists(storage.join(model, metadata["weights"]["file"])):
            raise saved.SavedClassifierError(f"{model} is incomplete: {metadata['weights']['file']} is missing")
    return metadata


def check_shadow(cfg: ScoreConfig, candidate: dict, in_use: dict) -> None:
    """A candidate is compared row by row with the model in use: the same labels, positive class
    and token length, or the comparison would not be of like with like."""
    for key, what in (("labels", "labels"), ("positive_label", "positive class"), ("max_length", "token length")):
        if candidate[key] != in_use[key]:
            raise ValueError(f"--shadow {cfg.shadow} has {what} {candidate[key]!r}, the model in use {cfg.model} "
                             f"{in_use[key]!r}: a shadow run compares the two row by row, so they must agree")


@dataclass(frozen=True)
class InUse:
    """A shadow run's model in use, scored beside the candidate."""

    url: str
    version: str
    positive: str
    precision: PrecisionChoice


def plan_run(cfg: ScoreConfig, metadata: dict, in_use_metadata: dict | None = None) -> tuple[Run, ScoreSummary]:
    """Everything settled before any Ray work, for the classifier of `metadata` (a shadow run's
    candidate; `in_use_metadata` is then the model in use's): the files to score (those the mode
    asks for, checked up front), the output's columns and the precision."""
    classifier_version, labels, max_length = saved.model_version(metadata), metadata["labels"], metadata["max_length"]
    model_version = classifier_version
    if cfg.threshold is not None:
        if len(labels) != 2:
            raise ValueError(f"--threshold applies to a classifier of two labels; {cfg.model} has {len(labels)}")
        model_version = f"{classifier_version}-t{cfg.threshold!r}"  # other labels (repr: every digit)
    carried_columns = [c for c in dict.fromkeys([cfg.id_column, *cfg.keep]) if c and c != cfg.text_column]
    shadow_of = in_use_metadata["positive_label"] if in_use_metadata else None
    check_output_names(carried_columns, labels, shadow_of)
    table = ScoresTable(cfg.output)
    with store_step(f"listing {cfg.input}"):
        files, skipped = list_input_files(cfg.input, exclude=table.url)
    with store_step(f"reading the table {table.url}"):
        state = table.read_state()
    mode = "incremental" if cfg.incremental else "overwrite" if cfg.overwrite else "create"
    planned = plan_inputs(state, files, model_version, mode)
    table_types = {name: state.schema.field(name).type for name in carried_columns
                   if state.schema is not None and name in state.schema.names}
    carried_types, failed, rows = check_inputs(planned, cfg.text_column, carried_columns, table_types, cfg.quoted_tsv)
    keep_text = "text" in cfg.keep or cfg.text_column in cfg.keep
    data_schema = output_schema(carried_types, keep_text, labels, shadow_of)
    table.check_columns(state, table_schema(data_schema))
    to_score = [f for f in planned if f.url not in failed]
    rows_to_score = sum(rows[f.url] for f in to_score) if all(rows[f.url] is not None for f in to_score) else None
    from .scores_sink import new_run_id

    operating_point = metadata.get("operating_point") if cfg.threshold is None else None
    precision = cluster_precision(cfg.precision, operating_point, TASK_CPUS,  # a refusal comes before any work
                                  threshold_given=cfg.threshold is not None, exports=export_problems(metadata))
    threshold = (cfg.threshold if operating_point is None
                 else OperatingPoint(**operating_point).threshold_at(precision.precision))
    in_use = None
    if in_use_metadata is not None:
        in_use = InUse(cfg.model, saved.model_version(in_use_metadata), in_use_metadata["positive_label"],
                       cluster_precision(cfg.precision, in_use_metadata.get("operating_point"), TASK_CPUS,
                                         threshold_given=False, exports=export_problems(in_use_metadata)))
    run = Run(run_id=new_run_id(), model_url=cfg.shadow or cfg.model, table=table, state=state, to_score=to_score, rows_to_score=rows_to_score,
              footer_rows=rows, mode=mode, model_version=model_version, classifier_version=classifier_version,
              labels=labels, positive=metadata["positive_label"], operating_point=operating_point,
              precision=precision, max_length=max_length, carried_types=carried_types, keep_text=keep_text,
              data_schema=data_schema, in_use=in_use)
    summary = ScoreSummary(run_id=run.run_id, output=table.url, table_version=state.version, files_seen=len(files),
                           threshold=threshold, files_failed=failed, files_skipped=[asdict(f) for f in skipped])
    for file in skipped:
        logger.info(f"skipped {file.url}: {file.reason}")
    return run, summary


@dataclass
class Run:
    """What the driver settled before any Ray work."""

    run_id: str
    model_url: str  # what scores into the table: --model, or a shadow run's candidate
    table: ScoresTable
    state: TableState
    to_score: list[InputFile]
    rows_to_score: int | None  # None when a CSV among them has not been counted
    footer_rows: dict[str, int | None]  # each input's rows as its Parquet footer says (None: CSV)
    mode: str  # see scores_layout.RunOutput
    model_version: str  # what the table records: the classifier's version, and a --threshold given
    classifier_version: str  # what every replica must load
    labels: list[str]
    positive: str | None  # the class a binary classifier flags (the report's spam share)
    operating_point: dict | None  # the classifier's, unless --threshold replaces it
    precision: PrecisionChoice  # what every replica computes in, and why
    max_length: int
    carried_types: dict[str, pa.DataType]
    keep_text: bool
    data_schema: pa.Schema
    in_use: InUse | None = None  # a shadow run's model in use
