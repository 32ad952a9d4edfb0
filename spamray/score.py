"""Bulk scoring with Ray Data: archives in, one prediction row per message out.

    input files --read (one task per file, streamed in chunks)--> rows with source_file/source_row
      --tokenize (CPU map_batches: status, truncation, token ids)-->
      --score (actor pool of model replicas, one GPU each where there are GPUs)-->
      --write_parquet into staging--> verify every row once --> commit (see scores_folder)
"""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from . import saved, storage
from .config import PRECISIONS, ScoreConfig
from .inputs import check_columns, list_input_files, read_chunks
from .scores_folder import ScoresFolder, audit_staged, build_manifest, new_run_id, plan_run
from .tokenizer import get_tokenizer

SCOREABLE = ("ok", "truncated")
# Ray Data gathers a replica's output into blocks of up to this size before it writes them out.
# Its default (128 MiB) would gather a whole input file, so memory would grow with file size;
# 4 MiB (about 28,000 scored rows) keeps it flat and still makes output files of a useful size.
OUTPUT_BLOCK_BYTES = 4 << 20
# Rows per batch a replica receives when --batch-size is not given: enough for it to group them
# by length with little padding, and on a GPU enough to fill its model batches (GPU_BATCH_BUDGET).
RAY_BATCH_ROWS = {"cpu": 1024, "gpu": 16384}


def probability_column(label: str) -> str:
    """`p_spam` for "spam", `p_not_spam` for "not spam": a column name for each class."""
    return "p_" + re.sub(r"\W+", "_", label.strip().lower()).strip("_")


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
    """One model replica: loads the saved classifier once, then scores batches of token ids."""

    def __init__(self, model_url: str, threads: int, model_name: str, precision: str = "auto",
                 fail_once_at_batch: int | None = None, fault_marker: str | None = None):
        import torch

        from .classifier import TextClassifier

        torch.set_num_threads(threads)
        self.classifier = TextClassifier.load(model_url)
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            self.classifier.cuda()
        if resolve_precision(precision, on_gpu) == "bf16":
            self.classifier.to(torch.bfloat16)
        self.columns = [probability_column(label) for label in self.classifier.labels]
        self.model_name, self.version = model_name, self.classifier.version
        self.batches, self.fail_once_at_batch, self.fault_marker = 0, fail_once_at_batch, fault_marker

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        self._fault_drill()
        token_ids = batch["token_ids"].combine_chunks()
        offsets, flat = token_ids.offsets.to_numpy(), token_ids.values.to_numpy()
        scoreable = np.flatnonzero(np.isin(batch["status"].to_numpy(zero_copy_only=False), SCOREABLE))
        probs = self.classifier.score_token_ids([flat[offsets[row]:offsets[row + 1]] for row in scoreable])
        mask = np.ones(batch.num_rows, dtype=bool)
        mask[scoreable] = False  # null where not scored
        full = np.zeros((batch.num_rows, len(self.columns)), dtype=np.float32)
        full[scoreable] = probs
        label_ids = np.zeros(batch.num_rows, dtype=np.int64)
        label_ids[scoreable] = probs.argmax(axis=1)
        labels = np.asarray(self.classifier.labels, dtype=object)[label_ids]
        out = batch.drop_columns(["token_ids"])
        out = out.append_column("label", pa.array(labels, pa.string(), mask=mask))
        out = out.append_column("label_id", pa.array(label_ids, mask=mask))
        for column, values in zip(self.columns, full.T):
            out = out.append_column(column, pa.array(values, mask=mask))
        now = datetime.now(timezone.utc)
        return (out.append_column("model", pa.array([self.model_name] * batch.num_rows, pa.string()))
                .append_column("model_version", pa.array([self.version] * batch.num_rows, pa.string()))
                .append_column("scored_at", pa.array([now] * batch.num_rows, pa.timestamp("us", tz="UTC"))))

    def _fault_drill(self) -> None:
        if self.batches == self.fail_once_at_batch and not storage.exists(self.fault_marker):
            storage.write_bytes(self.fault_marker, b"replica died once on purpose\n")
            os._exit(1)  # as a crashed process would: no cleanup, no exception to catch


def score(cfg: ScoreConfig, log=print) -> dict:
    """Scores `cfg.input` into `cfg.output`; returns the run summary."""
    import ray
    import ray.data

    started = time.time()
    metadata = saved.read_metadata(cfg.model)  # a model that cannot load fails before any work
    if not storage.exists(storage.join(cfg.model, metadata["weights"]["file"])):
        raise saved.SavedClassifierError(f"{cfg.model} is incomplete: {metadata['weights']['file']} is missing")
    model_version, labels, max_length = metadata["weights"]["sha256"][:16], metadata["labels"], metadata["max_length"]
    files = list_input_files(cfg.input)
    carried_columns = [c for c in [cfg.id_column, *cfg.keep] if c and c != cfg.text_column]
    check_columns(files, [cfg.text_column, *carried_columns])

    folder = ScoresFolder(cfg.output)
    folder.recover(log)
    manifest = folder.read_manifest()
    to_score, carried, dropped = plan_run(manifest, files, model_version, cfg.incremental, cfg.overwrite, log)
    run_id = new_run_id()
    summary = {"run_id": run_id, "output": cfg.output, "files_seen": len(files), "files_scored": len(to_score),
               "rows_read": 0, "rows_written": 0, "rows_per_status": {}, "rows_per_label": {}}
    if not to_score:
        log(f"nothing new to score in {cfg.input} ({len(files)} files already scored with model {model_version})")
        return {**summary, "seconds": time.time() - started, "rows_per_second": 0.0}

    keep_text = "text" in cfg.keep or cfg.text_column in cfg.keep
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    batch_rows = cfg.batch_size or RAY_BATCH_ROWS["gpu" if use_gpu else "cpu"]
    precision = resolve_precision(cfg.precision, use_gpu)
    reserved_cpus = replica_cpu_reservation(cfg.replicas, cfg.cpus_per_replica, ray.cluster_resources().get("CPU", 1))
    staging = folder.staging_url(run_id)
    dataset = (
        ray.data.from_items([{"path": f.url} for f in to_score], override_num_blocks=len(to_score))
        .map_batches(_read_files, batch_size=1, batch_format="pyarrow",
                     fn_kwargs={"text_column": cfg.text_column, "carried": carried_columns, "chunk_rows": cfg.read_batch_rows})
        .map_batches(tokenize_batch, batch_size=batch_rows * 4, batch_format="pyarrow",
                     fn_kwargs={"max_length": max_length, "keep_text": keep_text})
        .map_batches(Scorer, batch_size=batch_rows, batch_format="pyarrow",
                     compute=ray.data.ActorPoolStrategy(size=cfg.replicas),
                     num_cpus=reserved_cpus, num_gpus=1 if use_gpu else 0,
                     fn_constructor_kwargs={"model_url": cfg.model, "threads": cfg.cpus_per_replica,
                                            "model_name": cfg.model, "precision": precision,
                                            "fail_once_at_batch": cfg.fail_once_at_batch,
                                            "fault_marker": f"{staging}.fault-drill"})
    )
    dataset.context.target_max_block_size = OUTPUT_BLOCK_BYTES
    log(f"scoring {len(to_score)} of {len(files)} files from {cfg.input} with {cfg.model} ({model_version}), "
        f"{cfg.replicas} replica(s){' on GPUs' if use_gpu else ''}, {precision}")
    dataset.write_parquet(staging)
    audit = audit_staged(folder.fs, folder.staging_path(run_id), to_score)
    summary.update(rows_read=sum(audit.rows_per_file.values()), rows_written=audit.rows_written,
                   rows_per_status=dict(audit.rows_per_status), rows_per_label=dict(audit.rows_per_label))
    run = {"run_id": run_id, "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
           "finished_at": datetime.now(timezone.utc).isoformat(), "files_scored": [f.url for f in to_score],
           "rows": summary["rows_written"], "precision": precision}
    folder.commit(run_id, build_manifest(manifest, carried, to_score, audit.rows_per_file, run, cfg.model,
                                         model_version, labels), carried, dropped)
    storage.remove(f"{staging}.fault-drill")
    elapsed = time.time() - started
    summary.update(seconds=elapsed, rows_per_second=summary["rows_written"] / elapsed)
    log(format_summary(summary))
    return summary


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """`auto` is bf16 on a GPU (tensor cores; labels as fp32's on 99.75% of messages measured) and
    fp32 on a CPU (without bf16 matrix units, bf16 only adds conversions there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    return ("bf16" if on_gpu else "fp32") if precision == "auto" else precision


def replica_cpu_reservation(replicas: int, cpus_per_replica: int, cluster_cpus: float) -> float:
    """CPUs each replica reserves: its share, but never so many that the read and write tasks
    find no CPU left (they would wait for the replicas, which wait for them). The replica still
    runs `cpus_per_replica` threads: reading and writing need little CPU while it computes."""
    share = (cluster_cpus - 1) / replicas
    return float(min(cpus_per_replica, share)) if share >= 0.5 else 0.5


def _read_files(batch: pa.Table, text_column: str, carried: list[str], chunk_rows: int):
    for path in batch["path"].to_pylist():
        yield from read_chunks(path, text_column, carried, chunk_rows)


def format_summary(summary: dict) -> str:
    statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(summary["rows_per_status"].items()))
    labels = ", ".join(f"{k} {v:,}" for k, v in sorted(summary["rows_per_label"].items()) if k != "None")
    return (f"scored {summary['files_scored']} of {summary['files_seen']} files: {summary['rows_read']:,} rows read, "
            f"{summary['rows_written']:,} rows written ({statuses}); predicted {labels}; "
            f"{summary['rows_per_second']:,.0f} rows/s; output in {summary['output']}")
