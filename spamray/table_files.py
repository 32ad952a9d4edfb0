"""Writing the scores table's data files (in Ray's writer tasks): one Parquet file per input file
per batch, into that input's partition folder, with the identity columns and Delta statistics."""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import asdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from . import storage
from .inputs import InputFile
from .scores_layout import IDENTITY, WrittenFile, partition_folder, partition_values
from .table_stats import file_stats

# What a writer task returns: a row per data file written, or per input that failed in the batch.
WRITTEN = pa.schema([("path", pa.string()), ("source_file", pa.string()), ("rows", pa.int64()),
                     ("bytes", pa.int64()), ("stats", pa.string()), ("file_error", pa.string()),
                     ("replica_nodes", pa.string())])


def write_data_files(batch: pa.Table, table_url: str, run_id: str, model_version: str, data_schema: pa.Schema,
                     inputs: dict[str, InputFile]) -> pa.Table:
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
        file = write_file(fs, root, part.select(data_schema.names).cast(data_schema), inputs[source], model_version, run_id)
        written.append({**asdict(file), "file_error": None, "replica_nodes": nodes})
    return pa.Table.from_pylist(written, schema=WRITTEN)


def write_file(fs, root: str, rows: pa.Table, source: InputFile, model_version: str, run_id: str) -> WrittenFile:
    """One data file of `source`'s rows, in its partition folder, with its identity columns."""
    identity = (source.url, source.size, source.version, model_version, run_id)
    for (name, kind), value in zip(IDENTITY.items(), identity):
        rows = rows.append_column(name, pa.array([value] * rows.num_rows, kind))
    path = f"{partition_folder(partition_values(source, model_version, run_id))}/part-{run_id}-{uuid.uuid4().hex[:16]}.parquet"
    buffer = pa.BufferOutputStream()
    pq.write_table(rows, buffer, compression="zstd")
    data = buffer.getvalue()
    if isinstance(fs, LocalFileSystem):  # (object stores have no folders to make)
        fs.makedirs(f"{root}/{path.rsplit('/', 1)[0]}", exist_ok=True)
    fs.pipe_file(f"{root}/{path}", data.to_pybytes())  # one request: the file whole, its size known
    return WrittenFile(path, source.url, rows.num_rows, data.size, file_stats(rows))


def written_files(rows: list[dict]) -> tuple[dict[str, list[WrittenFile]], dict[str, str], list[str]]:
    """The writer tasks' rows, as (input -> its files, input -> error, the replicas' nodes)."""
    files, errors, nodes = defaultdict(list), {}, set()
    for row in rows:
        if row["file_error"] is not None:
            errors[row["source_file"]] = row["file_error"]
        else:
            files[row["source_file"]].append(WrittenFile(row["path"], row["source_file"], row["rows"], row["bytes"], row["stats"]))
            nodes.update(filter(None, (row["replica_nodes"] or "").split(",")))
    return dict(files), errors, sorted(nodes)
