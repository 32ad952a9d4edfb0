"""CSV and TSV files read strictly: every row as it was written, or an error naming the row.

CSV quotes fields (`"a, b"`, line breaks inside quotes, `""` for a quote). TSV as most tools
write it, the SMS Spam Collection among them, has no quoting: a line is a row and a quote is
text. A parser that is lenient about quotes merges rows without a word where a quote opens and
never closes (a message that begins with `"` swallows the lines after it). Python's csv module in
strict mode refuses such a file instead, and counts lines, so the error says where the row began.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import pyarrow as pa

# No message is this long; a quote that never closes reaches it long before the end of a large
# file, so the error comes without reading the whole file into one field.
MAX_FIELD_CHARS = 1 << 26
csv.field_size_limit(MAX_FIELD_CHARS)


class RowError(ValueError):
    """A row that cannot be read as written; nothing of its file is scored."""


class EmptyFile(RowError):
    """Not even a header line."""


def where(number: int, line: int) -> str:
    """A row as an error names it: data rows count from 1 (the header is row 0), lines from 1."""
    return f"data row {number} (line {line})"


def dialect(file_format: str, quoted_tsv: bool = False) -> dict:
    """The csv module's settings: CSV with quotes; TSV without, unless `quoted_tsv`."""
    if file_format == "csv" or quoted_tsv:
        return {"delimiter": "," if file_format == "csv" else "\t", "quotechar": '"', "doublequote": True,
                "strict": True}
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "strict": True}


class Rows:
    """The rows of one file, header first, blank lines left out, read in lists of rows, with the
    line each row begins on (for errors). Text is UTF-8; bytes that are not come through as lone
    surrogates (`surrogateescape`), so a caller can mark one row and go on."""

    def __init__(self, handle, file_format: str, quoted_tsv: bool = False):
        self.text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
        self.reader = csv.reader(self.text, **dialect(file_format, quoted_tsv))
        self.rows_read = 0  # the header is row 0
        self.last_line = 0  # where the last row read ended

    def take(self, count: int) -> tuple[list[list[str]], list[int]]:
        """Up to `count` more rows, and the line each begins on."""
        found, lines, last, reader = [], [], self.last_line, self.reader
        try:
            for fields in reader:
                start, last = last + 1, reader.line_num
                if fields:
                    found.append(fields)
                    lines.append(start)
                    if len(found) == count:
                        break
        except csv.Error as error:
            raise RowError(f"{where(self.rows_read + len(found), last + 1)}: {explain(error)}") from None
        self.rows_read, self.last_line = self.rows_read + len(found), last
        return found, lines

    def close(self) -> None:
        self.text.detach()  # the caller's file stays open: it closes it


def explain(error: csv.Error) -> str:
    message = str(error)
    if "unexpected end of data" in message:
        return ("a quoted field is never closed (a message that begins with a quote? quote the whole field and "
                "double the quotes inside it)")
    if "field larger than field limit" in message:
        return f"a field is longer than {MAX_FIELD_CHARS:,} characters (a quote that never closes?)"
    return f"{message}: where this row ends cannot be told (quote the whole field and double the quotes inside it)"


def header(handle, file_format: str, quoted_tsv: bool = False) -> list[str]:
    rows = Rows(handle, file_format, quoted_tsv)
    try:
        return header_of(rows)
    finally:
        rows.close()


def header_of(rows: Rows) -> list[str]:
    found, _ = rows.take(1)
    if not found:
        raise EmptyFile("is empty: a CSV/TSV file starts with a header line naming its columns")
    return found[0]


def batches(handle, file_format: str, columns: list[str] | None, batch_rows: int, binary: str | None = None,
            quoted_tsv: bool = False) -> Iterator[pa.Table]:
    """The named columns (None: all) in tables of up to `batch_rows` rows: `binary` as the bytes
    written where a value is not UTF-8, else as strings; the others as strings (a value that is
    not UTF-8 there fails the file, naming row and column)."""
    rows = Rows(handle, file_format, quoted_tsv)
    try:
        names = header_of(rows)
        columns = names if columns is None else columns
        missing = [column for column in columns if column not in names]
        if missing:
            raise RowError(f"has no column {missing[0]!r}; its columns are {names}")
        positions = {column: names.index(column) for column in columns}
        while True:
            first = rows.rows_read
            found, lines = rows.take(batch_rows)
            if not found:
                return
            check_widths(found, lines, first, len(names))
            yield to_table(found, lines, first, positions, binary)
    finally:
        rows.close()


def check_widths(found: list[list[str]], lines: list[int], first: int, width: int) -> None:
    if set(map(len, found)) != {width}:
        index = next(i for i, fields in enumerate(found) if len(fields) != width)
        raise RowError(f"{where(first + index, lines[index])} has {len(found[index])} fields, the header {width} "
                       "(a delimiter inside a value that is not quoted?)")


def to_table(found: list[list[str]], lines: list[int], first: int, positions: dict[str, int],
             binary: str | None) -> pa.Table:
    columns = {}
    for column, position in positions.items():
        values = [fields[position] for fields in found]
        try:
            columns[column] = pa.array(values, pa.string())
        except (UnicodeEncodeError, pa.ArrowException):  # a lone surrogate: bytes that were not UTF-8
            if column != binary:
                index = first_not_utf8(values)
                raise RowError(f"{where(first + index, lines[index])}: column {column!r} is not UTF-8 (only the text "
                               "column may hold other bytes; that row is then marked undecodable)") from None
            columns[column] = pa.array([value.encode("utf-8", "surrogateescape") for value in values], pa.binary())
    return pa.table(columns)


def first_not_utf8(values: list[str]) -> int:
    """The index of the first value with no UTF-8 (a lone surrogate)."""
    for index, value in enumerate(values):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return index
    raise AssertionError("every value is UTF-8")
