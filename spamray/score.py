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

import pyarrow as pa

from .config import ScoreConfig
from .driver_actors import scoring_turn
from .errors import SpamrayError, last_line, store_step
from .inputs import read_chunks
from .operating_point import OperatingPoint
from .progress import Progress
from .replica import Scorer, replica_cpu_reservation, replica_threads, tokenize_batch
from .score_plan import (TASK_CPUS, InUse, Run, ScoreSummary, check_shadow, format_summary, plan_run,
                         read_classifier)
from .scores_layout import table_schema

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
REPLICA_START_TIMEOUT_S = 1800


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


class ScoringFailed(SpamrayError, RuntimeError):
    """The Ray Data pipeline failed as a whole; nothing of the run is committed."""


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


