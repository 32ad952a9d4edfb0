"""Delta Lake statistics of the data files spamray writes and commits itself.

A Delta commit names each data file with statistics in JSON (the protocol's "Per-file
Statistics"): the row count, the nulls per column, and per column a lower and an upper bound
of its values. Engines skip a file when the bounds prove that no row can match a filter, so
a bound that is off by one value silently drops rows from query results. Every bound here is
therefore *safe*: `minValues` is <= every value of the column and `maxValues` is >= every
value, in the order the engines compare them; when no safe bound can be written, none is.

Per column type:

- integers and decimals: the exact minimum and maximum (decimals as exact JSON numbers,
  as Spark writes them; a float could round past the true value).
- floats: the minimum and maximum, but none when the column holds a NaN: Spark, Polars and
  DataFusion order NaN above every number (`x > 0.9` matches it), so no number bounds it
  (Delta's own footer-based statistics drop such bounds too). An infinite bound is written as
  the string "Infinity" or "-Infinity", as Spark writes it (JSON has no infinity) and as
  delta-rs reads it. A bound is left out only where no right one exists: leaving one out
  is safe by the protocol, but deltalake 1.6's pyarrow reader (`to_pyarrow_table` and
  `to_pandas` with `filters`) then skips the file for every filter on that column.
- timestamps: milliseconds in ISO-8601, as the protocol asks; the data has microseconds, so
  the minimum is rounded down and the maximum up to the millisecond (the protocol lets the
  maximum be truncated and trusts readers to add a millisecond; not every reader does). With
  a time zone they are UTC with a `Z`; without (timestamp_ntz), they carry no suffix.
- dates: `YYYY-MM-DD`.
- strings: at most 32 characters. The minimum is cut to its prefix (a prefix sorts before
  the string). A longer maximum is cut to its prefix too, whose last character that has a
  successor is then replaced by that successor and the rest dropped: a string that sorts
  after every string beginning with the prefix.
- booleans, binary, lists, maps and the rest: null counts only; no engine skips by them.

Struct columns are described field by field, mirroring the struct, as the protocol asks (a
single number in place of a struct makes delta-rs drop the file's statistics altogether). A
list or map column's null count is its number of null lists or maps, as Spark writes it.
Columns whose values are all null, like every column of an empty file, have no bounds.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

# Delta's default `dataSkippingStringPrefixLength`.
STRING_PREFIX_LENGTH = 32
LAST_CODE_POINT = 0x10FFFF
SURROGATES = range(0xD800, 0xE000)  # code points that no UTF-8 string holds

EPOCH = dt.datetime(1970, 1, 1)
EPOCH_DATE = dt.date(1970, 1, 1)
UNITS_PER_MILLISECOND = {"ms": 1, "us": 1_000, "ns": 1_000_000}
MILLISECONDS_PER_DAY = 86_400_000

Bound = Any  # a JSON-ready value: int, float, Decimal or str


def file_stats(rows: pa.Table) -> str:
    """Delta statistics JSON for a data file holding `rows`: numRecords, nullCount, minValues, maxValues.

    `rows` are the file's columns as written, so without the partition columns (which the
    log holds as partition values, not as statistics)."""
    stats = {"numRecords": rows.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for name, column in zip(rows.column_names, rows.columns):
        describe_column(name, column, stats["nullCount"], stats["minValues"], stats["maxValues"])
    return to_json(stats)


def describe_column(name: str, column: pa.ChunkedArray, null_counts: dict, lows: dict, highs: dict) -> None:
    """Enters one column's null count and bounds, recursing into struct fields."""
    if pa.types.is_struct(column.type):
        field_counts, field_lows, field_highs = {}, {}, {}
        for index, field in enumerate(column.type):
            # struct_field nulls a field's value where the whole struct is null, as the
            # Parquet file does: the value underneath is no value of the column.
            describe_column(field.name, pc.struct_field(column, [index]), field_counts, field_lows, field_highs)
        for into, nested in ((null_counts, field_counts), (lows, field_lows), (highs, field_highs)):
            if nested:
                into[name] = nested
        return
    null_counts[name] = column.null_count
    low, high = bounds(column)
    if low is not None:
        lows[name] = low
    if high is not None:
        highs[name] = high


def bounds(column: pa.ChunkedArray) -> tuple[Bound | None, Bound | None]:
    """A safe (lower, upper) bound of the column's values; None where there is none to give."""
    kind = column.type
    if column.null_count == len(column):
        return None, None
    if pa.types.is_dictionary(kind):
        return bounds(column.cast(kind.value_type))
    if pa.types.is_integer(kind) or pa.types.is_decimal(kind):
        return min_and_max(column)
    if pa.types.is_float32(kind) or pa.types.is_float64(kind):
        return float_bounds(column)
    if pa.types.is_timestamp(kind):
        return timestamp_bounds(column)
    if pa.types.is_date(kind):
        return date_bounds(column)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return string_bounds(column)
    return None, None


def min_and_max(column: pa.ChunkedArray) -> tuple[Any, Any]:
    extremes = pc.min_max(column)
    return extremes["min"].as_py(), extremes["max"].as_py()


def float_bounds(column: pa.ChunkedArray) -> tuple[float | str | None, float | str | None]:
    if pc.any(pc.is_nan(column)).as_py():
        return None, None
    low, high = min_and_max(column)
    return float_text(low), float_text(high)


def float_text(value: float) -> float | str:
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def timestamp_bounds(column: pa.ChunkedArray) -> tuple[str | None, str | None]:
    unit, zone = column.type.unit, column.type.tz
    low, high = min_and_max(column.cast(pa.int64()))
    if unit == "s":
        low_ms, high_ms = low * 1000, high * 1000
    else:
        low_ms, high_ms = low // UNITS_PER_MILLISECOND[unit], ceil_div(high, UNITS_PER_MILLISECOND[unit])
    suffix = "Z" if zone else ""  # zoned values are UTC instants; naive ones are wall-clock times
    return timestamp_text(low_ms, suffix), timestamp_text(high_ms, suffix)


def timestamp_text(milliseconds: int, suffix: str) -> str | None:
    try:
        moment = EPOCH + dt.timedelta(milliseconds=milliseconds)
    except OverflowError:  # beyond year 9999: no bound rather than a wrong one
        return None
    return moment.isoformat(timespec="milliseconds") + suffix


def date_bounds(column: pa.ChunkedArray) -> tuple[str | None, str | None]:
    low, high = min_and_max(column.cast(pa.int32() if pa.types.is_date32(column.type) else pa.int64()))
    if pa.types.is_date64(column.type):  # milliseconds, in principle whole days
        low, high = low // MILLISECONDS_PER_DAY, ceil_div(high, MILLISECONDS_PER_DAY)
    return date_text(low), date_text(high)


def date_text(days: int) -> str | None:
    try:
        return (EPOCH_DATE + dt.timedelta(days=days)).isoformat()
    except OverflowError:
        return None


def string_bounds(column: pa.ChunkedArray) -> tuple[str | None, str | None]:
    # Arrow compares strings by their UTF-8 bytes, as Delta does; that order is also the
    # order of code points, so the bounds below can be built character by character.
    if pa.types.is_string_view(column.type):
        column = column.cast(pa.large_string())
    low, high = min_and_max(column)
    return low[:STRING_PREFIX_LENGTH], string_upper_bound(high)


def string_upper_bound(value: str) -> str | None:
    """A string of at most STRING_PREFIX_LENGTH characters that sorts at or after `value`
    and after every string that `value` sorts after; None if there is none."""
    if len(value) <= STRING_PREFIX_LENGTH:
        return value
    prefix = value[:STRING_PREFIX_LENGTH]
    for end in reversed(range(len(prefix))):
        following = next_character(prefix[end])
        if following is not None:
            # Shorter than `value` and larger at position `end`: after it, and after every
            # string that sorts before it.
            return prefix[:end] + following
    return None


def next_character(character: str) -> str | None:
    code_point = ord(character) + 1
    if code_point in SURROGATES:
        code_point = SURROGATES.stop
    return chr(code_point) if code_point <= LAST_CODE_POINT else None


def ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


def to_json(value: Any) -> str:
    """JSON text of the statistics: json.dumps, except that decimals are written as exact
    numbers (json.dumps knows only floats, which would round them)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(key)}:{to_json(item)}" for key, item in value.items()) + "}"
    if isinstance(value, Decimal):
        return format(value, "f")
    return json.dumps(value)
