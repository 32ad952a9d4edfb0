"""Bulk scoring with Ray Data: archives in, one prediction row per message out.

    input files --read (one task per file, streamed in chunks)--> rows with source_file/source_row
      --tokenize (CPU map_batches: status, truncation, token ids)-->
      --score (actor pool of model replicas, one GPU each where there are GPUs)-->
      --write (a Ray Datasink, scores_sink: Parquet files into the Delta table, one per input file per batch)-->
    driver: verify every row once --> one Delta commit (see scores_table) --> vacuum of removed files
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
import pyarrow as pa

from . import saved, storage
from .config import ScoreConfig
from .driver_actors import scoring_turn
from .errors import SpamrayError, last_line, store_step
from .classifier import probability_column
from .inputs import InputFile, check_inputs, list_input_files, read_chunks
from .onnx_graphs import export_problems
from .operating_point import OperatingPoint
from .precision import PrecisionChoice, cluster_precision
from .progress import Progress
from .replica import Scorer, in_use_probability_column, replica_cpu_reservation, replica_threads, tokenize_batch
from .scores_layout import IDENTITY, PARTITIONS, TableState, plan_inputs, table_schema
from .scores_table import ScoresTable

logger = logging.getLogger(__name__)
# Ray Data gathers a replica's output into blocks of up to this size before they move on to the
# writers. Its default (128 MiB) would gather a whole input file, so memory would grow with file
# size; 4 MiB (about 28,000 scored rows) keeps it flat.
OUTPUT_BLOCK_BYTES = 4 << 20
# Rows per batch a replica receives when --batch-size is not given: enough for it to group them
# by length with little padding, and on a GPU enough to fill its model batches (GPU_BATCH_BUDGET).
RAY_BATCH_ROWS = {"cpu": 1024, "gpu": 16384}
# Rows a writer task gathers before it writes them, one Parquet file per input file among them:
# files of a useful size for readers, memory bounded per task.
WRITE_BATCH_ROWS = 32768
# Columns that travel through the pipeline but are not output.
INTERNAL_COLUMNS = {"token_ids", "file_error", "replica_node"}
# The CPU share each read, tokenize and write task asks for: small enough to fit beside a replica
# on any node. With whole CPUs, two replicas on two 1-CPU nodes left half a CPU on each and no
# task could start anywhere: the tasks waited for CPUs the replicas held, the replicas for rows.
TASK_CPUS = 0.25
REPLICA_START_TIMEOUT_S = 1800
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


def score(cfg: ScoreConfig) -> ScoreSummary:
    """Scores `cfg.input` into the Delta table `cfg.output`; returns the run summary. Files that
    failed (unreadable, changed during the run, or a batch of them kept killing its replica) are
    in `files_failed`; the others are committed."""
    started = time.time()
    metadata = read_classifier(cfg.shadow or cfg.model)  # a model that cannot load fails before waiting for a turn
    in_use = read_classifier(cfg.model) if cfg.shadow else None
    if in_use is not None:
        check_shadow(cfg, metadata, in_use)
    with scoring_turn(f"{cfg.input} into {cfg.output}", logger.info) as ledger:
        run, summary = plan_run(cfg, metadata, in_use)  # planned in its turn: it sees what the run before committed
        if run.to_score:
            score_into_table(cfg, run, summary, ledger, started)
        else:
            logger.info(f"nothing new to score in {cfg.input} ({summary.files_seen - len(summary.files_failed)} "
                        f"readable files already scored with model {run.model_version})")
    for url, error in summary.files_failed.items():
        logger.error(f"FAILED {url}: {error} (nothing of it committed; the next run tries it again)")
    summary.seconds = time.time() - started
    summary.rows_per_second = summary.rows_written / summary.seconds
    logger.info(format_summary(summary))
    return summary


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


class ScoringFailed(SpamrayError, RuntimeError):
    """The Ray Data pipeline failed as a whole; nothing of the run is committed."""


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


def score_into_table(cfg: ScoreConfig, run: Run, summary: ScoreSummary, ledger, started: float) -> None:
    """Runs the pipeline over `run.to_score` into the table's sink (which audits and commits);
    updates `summary`. `ledger` (a driver_actors.RunLedger actor) counts the batches' crashes and
    the rows written."""
    from .scores_sink import ScoresSink

    table, schema = run.table, table_schema(run.data_schema)
    if run.state.version is None:
        with store_step(f"creating the table {table.url}"):
            table.create(schema)
            run.state = table.read_state()
        table.check_columns(run.state, schema)
    dataset = scoring_pipeline(cfg, run, ledger)
    precision = run.precision.precision
    logger.info(f"scoring {len(run.to_score)} of {summary.files_seen} files from {cfg.input} with {run.model_url} "
                f"({run.model_version}), {cfg.replicas} replica(s), {precision} ({run.precision.reason}), "
                f"into {table.url}")
    log_operating_point(run.operating_point, precision)
    if run.in_use is not None:
        logger.info(f"a shadow run: the candidate {run.model_url} beside the model in use {run.in_use.url} "
                    f"({run.in_use.version}, {run.in_use.precision.precision}), each at its own operating point; "
                    "the table in use is not written")
    record = {"model": run.model_url, "model_version": run.model_version, "threshold": summary.threshold,
              "precision": precision, "precision_reason": run.precision.reason, "labels": run.labels,
              "positive": run.positive, "files_skipped": len(summary.files_skipped), "started": started}
    if run.in_use is not None:
        record["in_use"] = {"model": run.in_use.url, "model_version": run.in_use.version,
                            "precision": run.in_use.precision.precision}
    sink = ScoresSink(table, run.state, run.run_id, run.model_version, run.mode, run.data_schema, run.to_score,
                      record, WRITE_BATCH_ROWS, ledger, failed_up_front=dict(summary.files_failed),
                      footer_rows=run.footer_rows)
    write_with_progress(dataset, sink, ledger, run.rows_to_score)
    outcome = sink.outcome
    result, output, audit = outcome.result, outcome.output, outcome.audit
    added = [f for url in result.plan.adds for f in output.files[url]]
    summary.files_failed.update(outcome.file_errors)
    summary.replica_nodes, summary.precision = outcome.replica_nodes, precision
    summary.table_version, summary.files_scored = result.version, len(result.plan.adds)
    summary.files_already_scored = len(result.plan.already_scored)
    summary.rows_read = sum(audit.rows_per_file[url] for url in result.plan.adds)
    summary.rows_written, summary.bytes_written = sum(f.rows for f in added), sum(f.bytes for f in added)
    summary.data_files_added, summary.data_files_removed = len(added), len(result.plan.removes)
    summary.rows_per_status, summary.rows_per_label = dict(audit.rows_per_status), dict(audit.rows_per_label)
    if result.plan.already_scored:
        logger.info(f"{len(result.plan.already_scored)} file(s) were committed meanwhile by another run with the same model; "
            "this run's copies were dropped")
    try:
        removed = table.vacuum_removed(cfg.retention_hours)
        if removed:
            logger.info(f"vacuum: deleted {len(removed)} replaced files older than {cfg.retention_hours:g} h")
    except Exception as error:  # the rows are committed; a cleanup that failed is retried by the next run
        logger.warning(f"vacuum of {table.url} failed ({error}); the next run tries again")


def write_with_progress(dataset, sink, rows_written, rows_to_score: int | None) -> None:
    """Runs the pipeline into `sink`, showing the rows the writer tasks have written."""
    import ray

    progress = Progress("scoring", rows_to_score, "rows", logger)
    done = threading.Event()

    def show_progress():
        while not done.wait(0.5):
            progress.update(ray.get(rows_written.total.remote()))

    watcher = threading.Thread(target=show_progress, daemon=True)
    watcher.start()
    try:
        dataset.write_datasink(sink, ray_remote_args={"num_cpus": TASK_CPUS})
    except Exception as error:
        if isinstance(error, SpamrayError) and not isinstance(error, ray.exceptions.RayError):
            raise  # the sink's own, on the driver, which says what was committed
        # Ray's errors wrap the cause in tracebacks: name it in one line
        raise ScoringFailed(f"the scoring pipeline failed: {last_line(error)}; nothing was committed, and the next "
                            "run scores these files again") from error
    finally:
        done.set()
        watcher.join()
        progress.update(ray.get(rows_written.total.remote()))
        progress.close()


def scoring_pipeline(cfg: ScoreConfig, run: Run, batch_crashes):
    """The Ray Data pipeline: read -> tokenize -> score; its rows go to the table's sink (scores_sink)."""
    import ray
    import ray.data

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    batch_rows = cfg.batch_size or RAY_BATCH_ROWS["gpu" if use_gpu else "cpu"]
    reserved_cpus = replica_cpu_reservation(cfg.replicas, cfg.cpus_per_replica, ray.cluster_resources().get("CPU", 1))
    logger.info(f"each replica reserves {reserved_cpus:g} CPU(s) and computes on {replica_threads(reserved_cpus)} "
                f"thread(s)")
    dataset = (
        ray.data.from_items([{"path": f.url} for f in run.to_score], override_num_blocks=len(run.to_score))
        .map_batches(_read_files, batch_size=1, batch_format="pyarrow", num_cpus=TASK_CPUS,
                     fn_kwargs={"text_column": cfg.text_column, "carried": run.carried_types,
                                "chunk_rows": cfg.read_batch_rows, "quoted_tsv": cfg.quoted_tsv})
        .map_batches(tokenize_batch, batch_size=batch_rows * 4, batch_format="pyarrow", num_cpus=TASK_CPUS,
                     fn_kwargs={"max_length": run.max_length, "keep_text": run.keep_text})
        .map_batches(Scorer, batch_size=batch_rows, batch_format="pyarrow",
                     compute=ray.data.ActorPoolStrategy(size=cfg.replicas),
                     num_cpus=reserved_cpus, num_gpus=1 if use_gpu else 0,
                     fn_constructor_kwargs={"model_url": run.model_url, "threads": replica_threads(reserved_cpus),
                                            "model_name": run.model_url, "precision": run.precision.precision,
                                            "model_version": run.classifier_version,
                                            "batch_crashes": batch_crashes, "threshold": cfg.threshold,
                                            **in_use_arguments(run.in_use)})
    )
    dataset.context.target_max_block_size = OUTPUT_BLOCK_BYTES
    # A clear error, not a hang, when the cluster cannot place every replica (an autoscaler
    # bringing up nodes has this long).
    dataset.context.wait_for_min_actors_s = REPLICA_START_TIMEOUT_S
    return dataset


def in_use_arguments(in_use: InUse | None) -> dict:
    """The replica's arguments for a shadow run's model in use."""
    if in_use is None:
        return {}
    return {"in_use_url": in_use.url, "in_use_version": in_use.version, "in_use_precision": in_use.precision.precision}


def log_operating_point(point: dict | None, precision: str) -> None:
    """The threshold this run labels at (chosen at the replicas' precision), and the false-positive
    rate calibration measured for it."""
    if not point:
        return
    point = OperatingPoint(**point)
    measured = point.heldout_false_positive_rates.get(precision)
    rate = (f"held-out false-positive rate at {precision} {measured:.2%}" if measured is not None
            else f"no held-out false-positive rate measured at {precision} (run `spamray calibrate` again to measure it)")
    logger.info(f"labels at the operating point: {point.positive!r} when p >= {point.threshold_at(precision):.4f} at "
                f"{precision} (target false-positive rate {point.target_fpr:.2%}; {rate})")


def _read_files(batch: pa.Table, text_column: str, carried: dict[str, pa.DataType], chunk_rows: int,
                quoted_tsv: bool):
    for path in batch["path"].to_pylist():
        yield from read_chunks(path, text_column, carried, chunk_rows, quoted_tsv)


def format_summary(summary: ScoreSummary) -> str:
    statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(summary.rows_per_status.items()))
    labels = ", ".join(f"{k} {v:,}" for k, v in sorted(summary.rows_per_label.items()) if k != "None")
    failed = f"; {len(summary.files_failed)} FAILED" if summary.files_failed else ""
    skipped = f"; {len(summary.files_skipped)} skipped" if summary.files_skipped else ""
    nodes = f"; replicas on node(s) {', '.join(n[:12] for n in summary.replica_nodes)}" if summary.replica_nodes else ""
    return (f"scored {summary.files_scored} of {summary.files_seen} files{failed}{skipped}{nodes}: "
            f"{summary.rows_written:,} rows committed ({statuses or 'none'}); predicted {labels or 'nothing'}; "
            f"{summary.rows_per_second:,.0f} rows/s; table {summary.output} at version {summary.table_version}")
