"""`spamray report` on a table of many nights: its seconds, against reading the whole table
(every column, as a query of one's own would) in the same process.

    python bench/report.py [--nights 300] [--rows 200] [--s3]

Each night is one input file of `--rows` messages committed through spamray's own sink and
commit (scores_sink.ScoresSink), with made-up probabilities and no model: the table's log, its
commit records and its files are what a real night leaves. With --s3 the table lives on the
loopback S3 endpoint (moto's server) instead of local disk.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from spamray.inputs import list_input_files  # noqa: E402
from spamray.report import report  # noqa: E402
from spamray.score_plan import output_schema  # noqa: E402
from spamray.scores_layout import table_schema  # noqa: E402
from spamray.scores_sink import ScoresSink, new_run_id  # noqa: E402
from spamray.scores_table import ScoresTable  # noqa: E402

LABELS = ["not spam", "spam"]


def night_rows(source: str, rows: int, rng: np.random.Generator) -> pa.Table:
    """What the replicas hand the sink for one input file: made-up scores, about 12% spam."""
    p_spam = np.where(rng.random(rows) < 0.12, rng.beta(8, 1, rows), rng.beta(1, 8, rows)).astype(np.float32)
    labels = np.where(p_spam >= 0.5, "spam", "not spam")
    return pa.table({
        "source_row": pa.array(np.arange(rows), pa.int64()), "status": ["ok"] * rows,
        "n_tokens": pa.array(rng.integers(5, 60, rows), pa.int32()), "label": labels,
        "label_id": pa.array((labels == "spam").astype(np.int64)), "p_not_spam": 1 - p_spam, "p_spam": p_spam,
        "model": ["bench"] * rows, "scored_at": pa.array([datetime.now(timezone.utc)] * rows, pa.timestamp("us", tz="UTC")),
        "source_file": [source] * rows, "file_error": pa.nulls(rows, pa.string()), "replica_node": ["bench"] * rows})


def commit_night(table: ScoresTable, archive: str, night: int, rows: int, rng: np.random.Generator) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": ["x"] * rows}), buffer)
    fs, path = ScoresTable(archive).fs, ScoresTable(archive).path
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/night-{night:04d}.parquet", buffer.getvalue().to_pybytes())
    state = table.read_state()
    new = [f for f in list_input_files(archive)[0] if f.url.endswith(f"night-{night:04d}.parquet")]
    schema = output_schema({}, False, LABELS)
    if state.version is None:
        table.create(table_schema(schema))
        state = table.read_state()
    record = {"model": "bench", "model_version": "bench-v1", "threshold": 0.5, "precision": "fp32",
              "precision_reason": "bench", "labels": LABELS, "positive": "spam", "files_skipped": 0,
              "started": time.time() - 60}
    sink = ScoresSink(table, state, new_run_id(), "bench-v1", "incremental", schema, new, record, 32768)
    written = sink.write([night_rows(new[0].url, rows, rng)], None)
    sink.on_write_complete(SimpleNamespace(write_returns=[written]))


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nights", type=int, default=300)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--s3", action="store_true")
    args = parser.parse_args()
    if args.s3:
        import boto3
        from loopback_s3 import start_s3_endpoint

        server, settings = start_s3_endpoint()
        os.environ.update(settings)
        boto3.client("s3").create_bucket(Bucket="bench")
        place = "s3://bench"
    else:
        place = tempfile.mkdtemp(prefix="spamray-report-bench-")
    table = ScoresTable(f"{place}/scores")
    rng = np.random.default_rng(0)
    made = timed(lambda: [commit_night(table, f"{place}/archive", n, args.rows, rng) for n in range(args.nights)])
    print(f"{args.nights} nights of {args.rows} rows committed in {made:.1f} s ({'S3 endpoint' if args.s3 else 'local disk'})")
    for round in range(2):
        whole = timed(lambda: table.read())
        everything = timed(lambda: report(table.url))
        last_week = timed(lambda: report(table.url, last=7))
        print(f"round {round + 1}: reading the whole table {whole:.2f} s; report of all {args.nights} nights "
              f"{everything:.2f} s ({everything / whole:.2f}x); report of the last 7 {last_week:.2f} s "
              f"({last_week / whole:.2f}x)")
    if args.s3:
        server.terminate()


if __name__ == "__main__":
    main()
