"""The scores output: a Delta Lake table, one atomic commit per run, safe when runs overlap.

Layout. The table is partitioned by what identifies one scoring of one input file: `source_file`,
`source_size`, `source_version` (etag or modification time), `model_version` and `run_id`. So
each data file holds rows of one input file scored once, and the transaction log itself is the
record of what has been scored: the partition values and row counts of the live files. It is
committed with the rows, in the same transaction, and read without touching any data.

Writing. Writer tasks put Parquet files straight into the table folder (`part-RUN-….parquet`);
no reader sees them until a commit names them. The driver proves that each input's rows came
through exactly once (`audit_written`), then commits in one transaction the new files and the
removal of the files that held older rows of the same inputs: in no table version are an
input's rows half old, half new, or gone.

Overlap. A run commits only against the table version it planned on (`max_commit_retries=0`).
When another commit came first, it reads the new version, drops the inputs that the other run
already scored the same way (deleting only its own, never-committed files), recomputes what to
remove, and tries again. Files that no commit names (a killed run's) are invisible to readers
and go with `vacuum` once older than the retention.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .inputs import InputFile

logger = logging.getLogger(__name__)

PARTITIONS = {"source_file": pa.string(), "source_size": pa.int64(), "source_version": pa.string(),
              "model_version": pa.string(), "run_id": pa.string()}
COMMIT_ATTEMPTS = 20
OLD_FORMAT_MANIFEST = "_manifest.json"
WRITTEN = pa.schema([("path", pa.string()), ("source_file", pa.string()), ("rows", pa.int64()),
                     ("bytes", pa.int64()), ("stats", pa.string()), ("file_error", pa.string()),
                     ("replica_nodes", pa.string())])


@dataclass
class ScoredInput:
    """One input file as the table holds it: the partition values of its files, and the files."""

    size: int
    version: str
    model_version: str
    run_id: str
    rows: int = 0
    files: dict[str, int] = field(default_factory=dict)  # path in the table -> bytes


@dataclass
class TableState:
    version: int | None  # None: no table yet
    inputs: dict[str, ScoredInput] = field(default_factory=dict)
    columns: dict[str, str] | None = None  # column -> Delta type


@dataclass(frozen=True)
class WrittenFile:
    path: str  # relative to the table root
    source_file: str
    rows: int
    bytes: int
    stats: str


@dataclass
class RunOutput:
    """What a run wrote and audited, before its commit."""

    run_id: str
    model_version: str
    mode: str  # "create" (the table must hold no scores), "overwrite" or "incremental"
    inputs: dict[str, InputFile]
    files: dict[str, list[WrittenFile]]
    failed: set[str] = field(default_factory=set)  # inputs that failed this run: their old rows stay


@dataclass
class CommitPlan:
    adds: list[str]  # inputs whose new files go in
    removes: dict[str, int]  # paths (-> bytes) of the files they replace
    already_scored: list[str]  # inputs another run committed the same way meanwhile


@dataclass
class CommitResult:
    version: int | None  # the table version holding this run's rows (None: nothing committed)
    plan: CommitPlan
    attempts: int


class ScoresTable:
    def __init__(self, url: str):
        self.fs, self.path = storage.url_to_fs(str(url).rstrip("/"))
        self.local = storage.is_local(url)
        self.url = self.path if self.local else self.fs.unstrip_protocol(self.path)

    # -- reading the log --------------------------------------------------------------------
    def read_state(self) -> TableState:
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(self.url):
            self._refuse_other_content()
            return TableState(version=None)
        table = DeltaTable(self.url)
        columns = {f["name"]: json.dumps(f["type"]) for f in json.loads(table.schema().to_json())["fields"]}
        missing = [name for name in PARTITIONS if name not in columns]
        if missing or table.metadata().partition_columns != list(PARTITIONS):
            raise ValueError(f"{self.url} is a Delta table but not a spamray scores table (partitioned by "
                             f"{', '.join(PARTITIONS)}); choose another --output")
        state = TableState(version=table.version(), columns=columns)
        files = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        for file in files:
            url = file["partition.source_file"]
            key = (int(file["partition.source_size"]), file["partition.source_version"],
                   file["partition.model_version"], file["partition.run_id"])
            scored = state.inputs.setdefault(url, ScoredInput(*key))
            if (scored.size, scored.version, scored.model_version, scored.run_id) != key:
                raise RuntimeError(f"{self.url} holds rows of {url} from two scorings ({scored.run_id}, {key[3]}): "
                                   "the table was changed outside spamray; remove one of them before scoring")
            scored.rows += file["num_records"] or 0
            scored.files[file["path"]] = file["size_bytes"]
        return state

    def read(self, version: int | None = None, columns: list[str] | None = None) -> pa.Table:
        """The table's rows at `version` (default: the latest), partition columns included.

        It reads the files the log names with pyarrow: deltalake's own scanner can abort the
        process at exit after a successful read (delta-rs #2184), and a scheduler must be able
        to trust exit codes. Other engines read the table as any Delta table."""
        from deltalake import DeltaTable

        table = DeltaTable(self.url, version=version)
        parts = []
        for file in pa.table(table.get_add_actions(flatten=True)).to_pylist():
            with self.fs.open(f"{self.path}/{file['path']}", "rb") as handle:
                part = pq.read_table(handle)
            for name, kind in PARTITIONS.items():
                part = part.append_column(name, pa.array([file[f"partition.{name}"]] * part.num_rows).cast(kind))
            parts.append(part.select(columns) if columns else part)
        return pa.concat_tables(parts, promote_options="permissive") if parts else pa.table({})

    def _refuse_other_content(self) -> None:
        if not self.fs.exists(self.path) or not self.fs.ls(self.path):
            return
        if self.fs.exists(f"{self.path}/{OLD_FORMAT_MANIFEST}"):
            raise FileExistsError(
                f"{self.url} holds scores in spamray's earlier folder format ({OLD_FORMAT_MANIFEST}); scores are now "
                "a Delta Lake table. Score into a new --output (the old folder's Parquet files stay readable with "
                "pandas or pyarrow), or move the old folder away and run again to rescore everything.")
        raise FileExistsError(f"{self.url} exists and is not a Delta table; choose another --output")

    # -- creating ---------------------------------------------------------------------------
    def create(self, schema: pa.Schema) -> None:
        """An empty table with this schema, unless one exists (then its columns must match)."""
        from deltalake import DeltaTable

        try:
            DeltaTable.create(self.url, schema, mode="ignore", partition_by=list(PARTITIONS),
                              name="spamray scores", description="spamray score output: one row per input row")
        except Exception:
            if not DeltaTable.is_deltatable(self.url):  # not a concurrent first run that won the race
                raise

    def check_columns(self, state: TableState, schema: pa.Schema) -> None:
        wanted = delta_columns(schema)
        if state.columns is not None and state.columns != wanted:
            extra = sorted(set(wanted) - set(state.columns))
            lacking = sorted(set(state.columns) - set(wanted))
            retyped = sorted(c for c in set(wanted) & set(state.columns) if wanted[c] != state.columns[c])
            raise ValueError(f"{self.url} has other columns than this run writes (new: {extra}, not written: {lacking}, "
                             f"other type: {retyped}); use the same --id-column/--keep and labels as the table's "
                             "earlier runs, or another --output")

    # -- committing -------------------------------------------------------------------------
    def commit(self, state: TableState, output: RunOutput, schema: pa.Schema, metadata: dict,
               ) -> CommitResult:
        """Commits the run's files against `state`, planning again whenever another commit came first."""
        from deltalake.exceptions import CommitFailedError

        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            if any(scored.run_id == output.run_id for scored in state.inputs.values()):
                # An attempt that reported failure had landed after all: the rows are in.
                return CommitResult(state.version, plan_commit(state, output), attempt)
            plan = plan_commit(state, output)
            self.delete([f.path for url in plan.already_scored for f in output.files[url]], state)
            if not plan.adds and not plan.removes:
                return CommitResult(None, plan, attempt)
            try:
                version = self._commit_once(state, output, plan, schema, metadata)
                return CommitResult(version, plan, attempt)
            except CommitFailedError as error:
                newer = self.read_state()
                if newer.version == state.version:
                    raise RuntimeError(f"the commit to {self.url} failed: {error}; nothing was committed") from error
                logger.info(f"another run committed version {newer.version} of {self.url} first; planning the commit again")
                state = newer
        raise RuntimeError(f"{self.url}: other commits came first {COMMIT_ATTEMPTS} times in a row; nothing was "
                           "committed (are many runs writing this table at once?)")

    def _commit_once(self, state: TableState, output: RunOutput, plan: CommitPlan, schema: pa.Schema,
                     metadata: dict) -> int:
        from deltalake import DeltaTable
        from deltalake.transaction import AddAction, CommitProperties, RemoveAction

        now = int(time.time() * 1000)
        actions = []
        for url in plan.adds:
            file = output.inputs[url]
            partition = partition_values(url, file.size, file.version, output.model_version, output.run_id)
            actions += [AddAction(f.path, f.bytes, partition, now, True, f.stats) for f in output.files[url]]
        removed_inputs = {path: (url, scored) for url, scored in state.inputs.items() for path in scored.files}
        for path, size in plan.removes.items():
            url, scored = removed_inputs[path]
            partition = partition_values(url, scored.size, scored.version, scored.model_version, scored.run_id)
            actions.append(RemoveAction(path, True, now, size=size, partition_values=partition))
        table = DeltaTable(self.url, version=state.version)
        # No retries inside delta-rs: on any newer commit this fails, and `commit` plans again.
        table.create_write_transaction(actions, mode="append", schema=schema, partition_by=list(PARTITIONS),
                                       commit_properties=CommitProperties(custom_metadata=metadata, max_commit_retries=0))
        return state.version + 1

    # -- files ------------------------------------------------------------------------------
    def own_files(self, run_id: str) -> list[str]:
        """Every data file this run wrote, committed or not (retried writer tasks included)."""
        return [p.rsplit("/", 1)[-1] for p in self.fs.glob(f"{self.path}/part-{run_id}-*.parquet")]

    def delete(self, paths: list[str], state: TableState) -> None:
        """Deletes files of this run, never one that `state` names (a commit reported as failed may
        have landed)."""
        live = {path for scored in state.inputs.values() for path in scored.files}
        doomed = [f"{self.path}/{path}" for path in paths if path not in live]
        if doomed:
            self.fs.rm(doomed)

    def vacuum(self, retention_hours: float) -> list[str]:
        """Deletes files that no commit names (killed runs') and files removed by commits, once
        older than the retention. A running run's files are unnamed until it commits, so the
        retention must be longer than the longest run."""
        from deltalake import DeltaTable

        return DeltaTable(self.url).vacuum(retention_hours=math.ceil(retention_hours), dry_run=False,
                                           enforce_retention_duration=False, full=True)


def plan_inputs(state: TableState, files: list[InputFile], model_version: str, mode: str) -> list[InputFile]:
    """The input files this run scores: all of them, or (incremental) those new, changed, or
    scored by another model version."""
    if state.inputs and mode == "create":
        raise FileExistsError("the output already holds scores; pass --overwrite to replace them, or "
                              "--incremental to score only new or changed files")
    if mode != "incremental":
        return files
    return [f for f in files if not is_scored(state.inputs.get(f.url), f, model_version)]


def plan_commit(state: TableState, output: RunOutput) -> CommitPlan:
    """What the commit adds and removes against `state`: each input's new files replace all of
    its old ones; an input another run committed the same way meanwhile is dropped."""
    if output.mode == "overwrite":
        replaced = [scored for url, scored in state.inputs.items() if url not in output.failed]
        return CommitPlan(list(output.inputs), {p: size for s in replaced for p, size in s.files.items()}, [])
    if output.mode == "create" and state.inputs:
        raise FileExistsError("another run committed scores to this table while this run was scoring; nothing was "
                              "committed (use --incremental for scheduled runs)")
    done = [url for url, file in output.inputs.items() if is_scored(state.inputs.get(url), file, output.model_version)]
    adds = [url for url in output.inputs if url not in done]
    removes = {p: size for url in adds if url in state.inputs for p, size in state.inputs[url].files.items()}
    return CommitPlan(adds, removes, done)


def is_scored(scored: ScoredInput | None, file: InputFile, model_version: str) -> bool:
    return scored is not None and (scored.size, scored.version, scored.model_version) == (file.size, file.version, model_version)


def partition_values(url: str, size: int, version: str, model_version: str, run_id: str) -> dict[str, str]:
    """One scoring of one input file, as the log's partition values (strings, in PARTITIONS order)."""
    return dict(zip(PARTITIONS, (url, str(size), version, model_version, run_id)))


def table_schema(data_schema: pa.Schema) -> pa.Schema:
    return pa.schema([*data_schema, *(pa.field(name, kind) for name, kind in PARTITIONS.items())])


def delta_columns(schema: pa.Schema) -> dict[str, str]:
    from deltalake import Schema

    return {f["name"]: json.dumps(f["type"]) for f in json.loads(Schema.from_arrow(schema).to_json())["fields"]}


# -- writing (in the writer tasks) ------------------------------------------------------------
def write_data_files(batch: pa.Table, table_url: str, run_id: str, data_schema: pa.Schema) -> pa.Table:
    """Writes the batch's rows into the table folder, one Parquet file per input file, and
    returns a row per file (WRITTEN). Rows that report their input failed (unreadable, or
    a batch that kept killing its replica) are not data: they come back as one row per input
    with `file_error` set, so the driver can leave that input out."""
    fs, root = storage.url_to_fs(table_url)
    written = []
    errors = batch.filter(pc.is_valid(batch["file_error"])).select(["source_file", "file_error"])
    for source, error in dict(zip(errors["source_file"].to_pylist(), errors["file_error"].to_pylist())).items():
        written.append({"path": None, "source_file": source, "rows": 0, "bytes": 0, "stats": None,
                        "file_error": error, "replica_nodes": None})
    rows = batch.filter(pc.is_null(batch["file_error"]))
    sources = rows["source_file"].combine_chunks().dictionary_encode()
    for index, source in enumerate(sources.dictionary.to_pylist()):
        part = rows.filter(pc.equal(sources.indices, index))
        nodes = ",".join(sorted(set(part["replica_node"].to_pylist()))) if "replica_node" in part.column_names else None
        file = write_file(fs, root, run_id, part.select(data_schema.names).cast(data_schema), source)
        written.append({**asdict(file), "file_error": None, "replica_nodes": nodes})
    return pa.Table.from_pylist(written, schema=WRITTEN)


def write_file(fs, root: str, run_id: str, rows: pa.Table, source: str) -> WrittenFile:
    name = f"part-{run_id}-{uuid.uuid4().hex[:16]}.parquet"
    with fs.open(f"{root}/{name}", "wb") as handle:
        pq.write_table(rows, handle, compression="zstd")
    return WrittenFile(name, source, rows.num_rows, fs.size(f"{root}/{name}"), file_stats(rows))


def file_stats(rows: pa.Table) -> str:
    """Delta file statistics: row count, nulls per column, and min/max of the numeric and time
    columns (what engines use to skip files)."""
    stats = {"numRecords": rows.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for name, column in zip(rows.column_names, rows.columns):
        stats["nullCount"][name] = column.null_count
        kind = column.type
        if rows.num_rows == column.null_count or not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                                                       or pa.types.is_timestamp(kind)):
            continue
        low, high = pc.min_max(column).values()
        if pa.types.is_timestamp(kind):
            low, high = (value.as_py().astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                         if kind.tz else value.as_py().isoformat(timespec="milliseconds") for value in (low, high))
        else:
            low, high = low.as_py(), high.as_py()
            if isinstance(low, float) and not (math.isfinite(low) and math.isfinite(high)):
                continue
        stats["minValues"][name], stats["maxValues"][name] = low, high
    return json.dumps(stats)


def written_files(rows: list[dict]) -> tuple[dict[str, list[WrittenFile]], dict[str, str], list[str]]:
    """The writer tasks' rows, as (input -> its files, input -> read error, the replicas' nodes)."""
    files, errors, nodes = defaultdict(list), {}, set()
    for row in rows:
        if row["file_error"] is not None:
            errors[row["source_file"]] = row["file_error"]
        else:
            files[row["source_file"]].append(WrittenFile(row["path"], row["source_file"], row["rows"], row["bytes"], row["stats"]))
            nodes.update(filter(None, (row["replica_nodes"] or "").split(",")))
    return dict(files), errors, sorted(nodes)


# -- the audit ----------------------------------------------------------------------------------
@dataclass
class Audit:
    """What one pass over a run's written files found."""

    rows_per_file: dict[str, int]  # input file -> rows scored, each row exactly once
    rows_written: int = 0
    rows_per_status: Counter = field(default_factory=Counter)
    rows_per_label: Counter = field(default_factory=Counter)


def audit_written(fs, root: str, files: dict[str, list[WrittenFile]], scored: list[InputFile],
                  batch_rows: int = 65536) -> Audit:
    """Proves that each scored file's rows are all there exactly once (source_row 0..n-1, no
    repeats) and counts statuses and labels. Parquet inputs are also checked against their row
    count. Reads back what was written, streaming: memory is a byte per input row."""
    audit = Audit(rows_per_file={})
    for file in scored:
        tally = RowTally(file.url)
        for written in files.get(file.url, []):
            with fs.open(f"{root}/{written.path}", "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=["source_row", "status", "label"]):
                    tally.add(batch.column("source_row").to_numpy(zero_copy_only=False))
                    audit.rows_written += batch.num_rows
                    audit.rows_per_status.update(_value_counts(batch.column("status")))
                    audit.rows_per_label.update(_value_counts(batch.column("label")))
        audit.rows_per_file[file.url] = tally.complete_count()
        if file.format == "parquet":
            fs_in, path = storage.url_to_fs(file.url)
            with fs_in.open(path, "rb") as handle:
                expected = pq.ParquetFile(handle).metadata.num_rows
            if audit.rows_per_file[file.url] != expected:
                raise RuntimeError(f"{file.url} has {expected} rows but {audit.rows_per_file[file.url]} were scored; "
                                   "nothing was committed")
    return audit


class RowTally:
    """Which rows of one input file came through: a byte per row, so a repeat shows at once."""

    def __init__(self, source: str):
        self.source, self.seen = source, np.zeros(0, dtype=np.uint8)

    def add(self, rows: np.ndarray) -> None:
        if len(rows) and rows.min() < 0:
            raise RuntimeError(f"rows of {self.source} have a negative source_row; nothing was committed")
        if len(rows) and rows.max() >= len(self.seen):
            grown = np.zeros(max(int(rows.max()) + 1, 2 * len(self.seen)), dtype=np.uint8)
            grown[:len(self.seen)] = self.seen
            self.seen = grown
        if len(np.unique(rows)) != len(rows) or self.seen[rows].any():
            raise RuntimeError(f"rows of {self.source} did not come through exactly once (a row is there twice); "
                               "nothing was committed")
        self.seen[rows] = 1

    def complete_count(self) -> int:
        """Rows seen, after checking that they are 0..n-1 with none missing."""
        count = int(self.seen.sum())
        last = int(np.flatnonzero(self.seen)[-1]) + 1 if count else 0
        if count != last:
            raise RuntimeError(f"rows of {self.source} did not come through exactly once ({last - count} of rows "
                               f"0..{last - 1} are missing); nothing was committed")
        return count


def _value_counts(column: pa.Array) -> dict[str, int]:
    counts = column.value_counts()  # a null (an unscored row's label) counts under "None"
    return {str(value): int(count) for value, count in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
