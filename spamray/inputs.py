"""Message archives to score: finding the files, checking them up front, reading them in chunks.

Every row read carries `source_file` and `source_row` (0-based row in that file), so each output
row traces back to its input and the commit step can prove that every row came through once.

A nightly archive holds more than clean data files: files still being written, empty ones, the
odd compressed dump, temporary folders of other jobs. None of them may wedge a run or vanish
unnoticed: a file spamray does not read is listed as skipped with the reason, and a file that
fails to read becomes a `file_error` row that names it, so the run can commit the other files
and still report the failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import delimited, storage

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}
# CSV/TSV dumps are often compressed whole; Parquet compresses inside the file.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
STATUS_UNDECODABLE = "undecodable"
STATUS_READ_ERROR = "read_error"
HIDDEN_PREFIXES = ("_", ".")  # _temporary/, _SUCCESS, .staging: other jobs' bookkeeping, never data


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    version: str  # modification time or etag: what tells a changed file from the same one

    @property
    def format(self) -> str:
        return file_format(self.url)[0]

    @property
    def compression(self) -> str | None:
        return file_format(self.url)[1]


@dataclass(frozen=True)
class SkippedFile:
    url: str
    reason: str


def file_format(url: str) -> tuple[str, str | None]:
    """(format, compression) from the file name: `a.csv.gz` is ("csv", "gzip")."""
    name = url.lower()
    compression = next((codec for suffix, codec in COMPRESSIONS.items() if name.endswith(suffix)), None)
    if compression:
        name = name.rsplit(".", 1)[0]
    for suffix, kind in FORMATS.items():
        if name.endswith(suffix) and not (compression and kind == "parquet"):
            return kind, compression
    readable = ", ".join([*FORMATS, *(f".csv{s}" for s in COMPRESSIONS)])
    raise ValueError(f"{url}: not a file type spamray reads ({readable}, and .tsv likewise)")


def list_input_files(url: str, exclude: str | None = None) -> tuple[list[InputFile], list[SkippedFile]]:
    """The data files behind a file, folder or glob, and every other file found there with the
    reason it is not read: hidden or temporary paths, unknown types, the `exclude` folder (the
    output table, when it sits under the input path). A file named explicitly is read whatever
    its name; a path that exists is that path, even where it holds `*?[`.

    Each file is named as the store lists it, and a local path in its one normal form: the URL of
    a file is its identity in the scores table, the same however the input was spelled."""
    fs, path = storage.url_to_fs(url)
    if storage.is_local(url):
        path = os.path.normpath(path)
    if fs.isdir(path):
        base, found = path.rstrip("/") + "/", fs.find(path, detail=True)
    elif fs.exists(path):
        file_format(url)  # a single file named explicitly must be readable: fail now, not later
        base, found = None, {path: fs.info(path)}
    elif any(char in path for char in "*?["):
        glob_at = min(path.find(char) for char in "*?[" if char in path)
        base, found = path[:path.rfind("/", 0, glob_at) + 1], fs.glob(path, detail=True)
    else:
        raise FileNotFoundError(f"input {url} does not exist (or cannot be read with the credentials at hand)")
    excluded = storage.url_to_fs(exclude)[1].rstrip("/") + "/" if exclude else None
    local = storage.is_local(url)
    files, skipped, skipped_table = [], [], False
    for p, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        name = p if local else fs.unstrip_protocol(p)
        if excluded and (p + "/").startswith(excluded):
            skipped_table = True
            continue
        if base is not None and any(part.startswith(HIDDEN_PREFIXES) for part in p[len(base):].split("/")):
            skipped.append(SkippedFile(name, "hidden or temporary path (a name starting with '_' or '.')"))
            continue
        try:
            file_format(p)
        except ValueError as error:
            skipped.append(SkippedFile(name, str(error).split(": ", 1)[1]))
            continue
        files.append(InputFile(url=name, size=int(info.get("size") or 0), version=input_version(info)))
    if skipped_table:
        skipped.append(SkippedFile(exclude, "the output table itself, under the input path"))
    if not files:
        raise FileNotFoundError(f"input {url} holds no {', '.join(FORMATS)} files"
                                + (f" ({len(skipped)} other files skipped)" if skipped else ""))
    return files, skipped


def input_version(info: dict) -> str:
    """What tells a changed file from the same one: its etag, else its modification time ("" where
    the filesystem reports neither: then only a change of size is seen)."""
    return next((str(info[key]) for key in ("ETag", "etag", "mtime", "LastModified", "updated") if info.get(key)), "")


def open_input(url: str):
    """A binary file object of the (decompressed) file."""
    fs, path = storage.url_to_fs(url)
    return fs.open(path, "rb", compression=file_format(url)[1])


def file_schema(file: InputFile, quoted_tsv: bool = False) -> tuple[pa.Schema, int | None]:
    """The file's columns, and its rows where its footer says (Parquet; a CSV is not counted)."""
    with open_input(file.url) as handle:
        if file.format == "parquet":
            metadata = pq.ParquetFile(handle).metadata
            return metadata.schema.to_arrow_schema(), metadata.num_rows
        return pa.schema([(name, pa.string()) for name in delimited.header(handle, file.format, quoted_tsv)]), None


def check_inputs(files: list[InputFile], text_column: str, carried: list[str],
                 table_types: dict[str, pa.DataType] | None = None, quoted_tsv: bool = False,
                 ) -> tuple[dict[str, pa.DataType], dict[str, str], dict[str, int | None]]:
    """Before any work: (the output type of each carried column, files that cannot be read or
    stored -> why, each readable file's rows where known).

    A file without a needed column fails the run at once (the options are wrong, not the file);
    a file that cannot be opened is reported and left out, and the others go on. CSV columns are
    text; a Parquet column keeps its type, made one that Delta tables hold. A column's type is the
    table's where the table has it, else the widest of the files' (int32 and int64 give int64,
    float32 and float64 float64, an all-null column takes the others' type); a file whose column
    cannot be cast to it without loss is that file's error.
    """
    found: dict[str, dict[str, pa.DataType]] = {}
    unreadable: dict[str, str] = {}
    rows: dict[str, int | None] = {}
    for file in files:
        try:
            schema, rows[file.url] = file_schema(file, quoted_tsv)
        except Exception as error:  # a broken file of any kind: reported, never the whole run
            unreadable[file.url] = f"cannot be read as {file.format}: {error}"
            continue
        missing = [column for column in [text_column, *carried] if column not in schema.names]
        if missing:
            raise ValueError(f"{file.url} has no column {missing[0]!r}; its columns are {schema.names}. "
                             "Name the right one with --text-column / --id-column / --keep.")
        found[file.url] = {column: delta_type(schema.field(column).type) if file.format == "parquet" else pa.string()
                           for column in carried}
    types = {column: (table_types or {}).get(column) or widest([kinds[column] for kinds in found.values()])
             for column in carried}
    for url, kinds in found.items():
        lossy = [column for column in carried if not widens_to(kinds[column], types[column])]
        if lossy:
            column = lossy[0]
            unreadable[url] = (f"column {column!r} is {kinds[column]} here but {types[column]} in the output; it cannot "
                               "be stored without loss (rewrite the file with that type, or leave the column out)")
            rows.pop(url, None)
    return {column: kind if not pa.types.is_null(kind) else pa.string() for column, kind in types.items()}, unreadable, rows


def widest(kinds: list[pa.DataType]) -> pa.DataType:
    """The type that the most of `kinds` widen to without loss (the files of other types are each
    that file's error); null where all are null."""
    return max(kinds, key=lambda target: sum(widens_to(kind, target) for kind in kinds), default=pa.null())


def widens_to(kind: pa.DataType, target: pa.DataType) -> bool:
    """Whether every value of `kind` casts to `target` as the same value."""
    if kind == target or pa.types.is_null(kind):
        return True
    if pa.types.is_integer(kind) and pa.types.is_integer(target):
        return target.bit_width >= kind.bit_width and pa.types.is_signed_integer(target)
    if pa.types.is_floating(kind) and pa.types.is_floating(target):
        return target.bit_width >= kind.bit_width
    return False


def delta_type(kind: pa.DataType) -> pa.DataType:
    """The type a Delta table stores a column of Arrow type `kind` as (no unsigned integers,
    microsecond timestamps, no large or dictionary variants; null stays null here, to take the
    type of the other files' column)."""
    if pa.types.is_dictionary(kind):
        return delta_type(kind.value_type)
    if pa.types.is_large_string(kind) or getattr(pa.types, "is_string_view", lambda _: False)(kind):
        return pa.string()
    if pa.types.is_large_binary(kind):
        return pa.binary()
    if pa.types.is_unsigned_integer(kind):
        return pa.int64()
    if pa.types.is_float16(kind):
        return pa.float32()
    if pa.types.is_timestamp(kind):
        # A timestamp without a time zone needs table protocol (3,7), which older Spark, Trino and
        # Athena readers cannot open: it is stored as UTC, the reading readers assume for it.
        return pa.timestamp("us", tz=kind.tz or "UTC")
    if pa.types.is_date64(kind):
        return pa.date32()
    return kind


def read_chunks(file_url: str, text_column: str, carried: dict[str, pa.DataType], chunk_rows: int,
                quoted_tsv: bool = False) -> Iterator[pa.Table]:
    """The file's rows in chunks: `text` (string, null where absent or undecodable), `status`
    ("undecodable" or null), the carried columns, `source_file`, `source_row`, `file_error`.

    A file that fails part way ends with one row of status "read_error" whose `file_error` says
    why; the scoring run then commits none of that file's rows and reports it."""
    first_row = 0
    try:
        with open_input(file_url) as handle:
            for batch in _record_batches(handle, file_format(file_url)[0], [text_column, *carried], chunk_rows,
                                         quoted_tsv):
                if batch.num_rows == 0:
                    continue
                text, status = decode_text(batch.column(text_column))
                columns = {"text": text, "status": status}
                columns.update({name: batch.column(name).cast(kind) for name, kind in carried.items() if name != "text"})
                yield _with_source(columns, file_url, np.arange(first_row, first_row + batch.num_rows), None)
                first_row += batch.num_rows
    except Exception as error:  # any failure, named with the file; see the docstring
        columns = {"text": pa.nulls(1, pa.string()), "status": pa.array([STATUS_READ_ERROR])}
        columns.update({name: pa.nulls(1, kind) for name, kind in carried.items() if name != "text"})
        problem = str(error) if isinstance(error, delimited.RowError) else f"{type(error).__name__}: {error}"
        yield _with_source(columns, file_url, np.array([-1]), problem)


def _with_source(columns: dict, file_url: str, rows: np.ndarray, error: str | None) -> pa.Table:
    columns["source_file"] = pa.array([file_url] * len(rows), pa.string())
    columns["source_row"] = pa.array(rows.astype(np.int64))
    columns["file_error"] = pa.array([error] * len(rows), pa.string())
    return pa.table(columns)


def _record_batches(handle, file_kind: str, columns: list[str], chunk_rows: int, quoted_tsv: bool) -> Iterator:
    columns = list(dict.fromkeys(columns))
    if file_kind == "parquet":
        yield from pq.ParquetFile(handle).iter_batches(batch_size=chunk_rows, columns=columns)
        return
    # The text as the bytes written, so that one bad byte sequence marks one row, not the whole
    # file; other columns as text, whatever they look like, so that every file gives them one type.
    yield from delimited.batches(handle, file_kind, columns, chunk_rows, binary=columns[0], quoted_tsv=quoted_tsv)


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
