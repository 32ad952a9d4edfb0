"""The audit before a commit: each input's rows came through exactly once, from the input as listed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import SpamrayError
from .inputs import InputFile, input_version
from .scores_layout import WrittenFile


class AuditFailed(SpamrayError, RuntimeError):
    """The written rows of an input are not its rows exactly once: nothing of the run is committed."""


@dataclass
class Audit:
    """What one pass over a run's written files found."""

    rows_per_file: dict[str, int]  # input file -> rows scored, each row exactly once
    rows_written: int = 0
    rows_per_status: Counter = field(default_factory=Counter)
    rows_per_label: Counter = field(default_factory=Counter)
    file_errors: dict[str, str] = field(default_factory=dict)  # inputs that changed under the run -> why


def audit_written(fs, root: str, files: dict[str, list[WrittenFile]], scored: list[InputFile],
                  batch_rows: int = 65536, footer_rows: dict[str, int | None] | None = None) -> Audit:
    """Proves that each scored file's rows are all there exactly once (source_row 0..n-1, no
    repeats) and counts statuses and labels. An input that is no longer as it was listed
    (rewritten while the run scored it), or a Parquet input whose row count differs from what
    was scored, is that file's error: its rows are left out and the next run scores it again.
    Reads back what was written, streaming, several inputs at once (on an object store each file
    is a round trip): memory is a byte per input row of those being read. `footer_rows` are Parquet
    inputs' rows as their footers said when the run was planned (read again where not given): an
    input whose size and version are unchanged since then holds the same rows."""
    audit = Audit(rows_per_file={})

    def audit_input(file: InputFile) -> tuple[str | None, int, FileCounts]:
        return audit_one_input(fs, root, files.get(file.url, []), file, batch_rows, (footer_rows or {}).get(file.url))

    for file, (problem, rows, counts) in zip(scored, storage.map_requests(audit_input, scored)):
        if problem is not None:
            audit.file_errors[file.url] = f"{problem}; nothing of it committed"
            continue
        audit.rows_per_file[file.url] = rows
        audit.rows_written += counts.rows
        audit.rows_per_status.update(counts.statuses)
        audit.rows_per_label.update(counts.labels)
    return audit


def audit_one_input(fs, root: str, written: list[WrittenFile], file: InputFile, batch_rows: int,
                    footer_rows: int | None = None) -> tuple[str | None, int, FileCounts]:
    """(what is wrong with the input, or None; its rows, each once; their counts)."""
    problem = changed_since_listing(file)
    tally, counts = RowTally(file.url), FileCounts()
    for part in written:
        with fs.open(f"{root}/{part.path}", "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=["source_row", "status", "label"]):
                tally.add(batch.column("source_row").to_numpy(zero_copy_only=False))
                counts.add(batch)
    rows = tally.complete_count()
    if problem is None and file.format == "parquet":
        expected = footer_rows if footer_rows is not None else parquet_rows(file.url)
        if rows != expected:
            problem = f"has {expected} rows but {rows} were scored (was it rewritten during the run?)"
    return problem, rows, counts


def changed_since_listing(file: InputFile) -> str | None:
    fs, path = storage.url_to_fs(file.url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return "was deleted while the run scored it"
    if (int(info.get("size") or 0), input_version(info)) != (file.size, file.version):
        return "changed while the run scored it (size or version differ from when it was listed)"
    return None


def parquet_rows(url: str) -> int:
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


class FileCounts:
    """Rows, statuses and labels of one input's written rows."""

    def __init__(self):
        self.rows, self.statuses, self.labels = 0, Counter(), Counter()

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        self.statuses.update(_value_counts(batch.column("status")))
        self.labels.update(_value_counts(batch.column("label")))


class RowTally:
    """Which rows of one input file came through: a byte per row, so a repeat shows at once."""

    def __init__(self, source: str):
        self.source, self.seen = source, np.zeros(0, dtype=np.uint8)

    def add(self, rows: np.ndarray) -> None:
        if len(rows) and rows.min() < 0:
            raise AuditFailed(f"rows of {self.source} have a negative source_row; nothing was committed")
        if len(rows) and rows.max() >= len(self.seen):
            grown = np.zeros(max(int(rows.max()) + 1, 2 * len(self.seen)), dtype=np.uint8)
            grown[:len(self.seen)] = self.seen
            self.seen = grown
        if len(np.unique(rows)) != len(rows) or self.seen[rows].any():
            raise AuditFailed(f"rows of {self.source} did not come through exactly once (a row is there twice); "
                               "nothing was committed")
        self.seen[rows] = 1

    def complete_count(self) -> int:
        """Rows seen, after checking that they are 0..n-1 with none missing."""
        count = int(self.seen.sum())
        last = int(np.flatnonzero(self.seen)[-1]) + 1 if count else 0
        if count != last:
            raise AuditFailed(f"rows of {self.source} did not come through exactly once ({last - count} of rows "
                               f"0..{last - 1} are missing); nothing was committed")
        return count


def _value_counts(column: pa.Array) -> dict[str, int]:
    counts = column.value_counts()  # a null (an unscored row's label) counts under "None"
    return {str(value): int(count) for value, count in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())}
