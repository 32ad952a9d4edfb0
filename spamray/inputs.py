"""Message archives to score: finding the files, checking them up front, reading them in chunks.

Every row read carries `source_file` and `source_row` (0-based row in that file), so each output
row traces back to its input and the commit step can prove that every row came through once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import storage

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}
STATUS_UNDECODABLE = "undecodable"


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    version: str  # modification time or etag: what tells a changed file from the same one

    @property
    def format(self) -> str:
        return file_format(self.url)


def file_format(url: str) -> str:
    for suffix, name in FORMATS.items():
        if url.lower().endswith(suffix):
            return name
    raise ValueError(f"{url}: unknown file type; spamray reads {', '.join(FORMATS)} files")


def list_input_files(url: str) -> list[InputFile]:
    """The data files behind a file, folder or glob (hidden and `_`-prefixed names skipped)."""
    fs, path = storage.url_to_fs(url)
    if any(char in path for char in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(path):
        paths = fs.find(path)
    elif fs.exists(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"input {url} does not exist (or cannot be read with the credentials at hand)")
    paths = sorted(p for p in paths if not any(part.startswith(("_", ".")) for part in p.split("/")[-1:])
                   and p.lower().endswith(tuple(FORMATS)))
    if not paths:
        raise FileNotFoundError(f"input {url} holds no {', '.join(FORMATS)} files")
    local = storage.is_local(url)
    files = []
    for p in paths:
        info = fs.info(p)
        version = next((str(info[key]) for key in ("ETag", "etag", "mtime", "LastModified", "updated") if info.get(key)), "")
        files.append(InputFile(url=p if local else fs.unstrip_protocol(p), size=int(info.get("size") or 0), version=version))
    return files


def file_columns(file: InputFile) -> list[str]:
    fs, path = storage.url_to_fs(file.url)
    with fs.open(path, "rb") as handle:
        if file.format == "parquet":
            return pq.read_schema(handle).names
        reader = pacsv.open_csv(handle, parse_options=_parse_options(file.format))
        return reader.schema.names


def check_columns(files: list[InputFile], needed: list[str]) -> None:
    """Fails before any work starts if a file lacks a needed column, naming file and columns."""
    for file in files:
        try:
            columns = file_columns(file)
        except (OSError, pa.ArrowInvalid) as error:
            raise ValueError(f"{file.url} cannot be read as {file.format}: {error}") from error
        missing = [column for column in needed if column not in columns]
        if missing:
            raise ValueError(f"{file.url} has no column {missing[0]!r}; its columns are {columns}. "
                             "Name the right one with --text-column / --id-column / --keep.")


def _parse_options(file_format: str) -> pacsv.ParseOptions:
    # Quoted messages may hold line breaks: slower to parse, but no message is split in two.
    return pacsv.ParseOptions(delimiter="\t" if file_format == "tsv" else ",", newlines_in_values=True)


def read_chunks(file_url: str, text_column: str, carried: list[str], chunk_rows: int) -> Iterator[pa.Table]:
    """The file's rows in chunks: `text` (string, null where absent or undecodable), `status`
    ("undecodable" or null), the carried columns, `source_file`, `source_row`."""
    fs, path = storage.url_to_fs(file_url)
    file_kind = file_format(file_url)
    first_row = 0
    with fs.open(path, "rb") as handle:
        for batch in _record_batches(handle, file_kind, [text_column, *carried], chunk_rows):
            if batch.num_rows == 0:
                continue
            text, status = decode_text(batch.column(text_column))
            columns = {"text": text, "status": status}
            columns.update({name: batch.column(name) for name in carried if name != "text"})
            columns["source_file"] = pa.array([file_url] * batch.num_rows, pa.string())
            columns["source_row"] = pa.array(np.arange(first_row, first_row + batch.num_rows, dtype=np.int64))
            first_row += batch.num_rows
            yield pa.table(columns)


def _record_batches(handle, file_kind: str, columns: list[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
    columns = list(dict.fromkeys(columns))
    if file_kind == "parquet":
        yield from pq.ParquetFile(handle).iter_batches(batch_size=chunk_rows, columns=columns)
        return
    # The text is read as bytes so that one bad byte sequence marks one row, not the whole file.
    reader = pacsv.open_csv(
        handle,
        read_options=pacsv.ReadOptions(block_size=1 << 22),
        parse_options=_parse_options(file_kind),
        convert_options=pacsv.ConvertOptions(include_columns=columns, column_types={columns[0]: pa.binary()},
                                             strings_can_be_null=False, quoted_strings_can_be_null=False),
    )
    for batch in reader:
        for start in range(0, batch.num_rows, chunk_rows):
            yield batch.slice(start, chunk_rows)


def decode_text(column: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(text as strings, status "undecodable" where the bytes are not UTF-8, else null)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string()), pa.nulls(len(column), pa.string())
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return pc.cast(column, pa.string()), pa.nulls(len(column), pa.string())
    try:  # the common case: all valid, one vectorized check
        return column.cast(pa.string()), pa.nulls(len(column), pa.string())
    except pa.ArrowInvalid:
        pass
    texts, statuses = [], []
    for value in column.to_pylist():
        try:
            texts.append(None if value is None else value.decode("utf-8"))
            statuses.append(None)
        except UnicodeDecodeError:
            texts.append(None)
            statuses.append(STATUS_UNDECODABLE)
    return pa.array(texts, pa.string()), pa.array(statuses, pa.string())
