"""The scores table as other engines read it, and after Delta's own maintenance: deltalake, Polars,
Ray Data, DuckDB and pyarrow read the same rows and columns as spamray; compaction, Z-ordering
and vacuum leave nights that need no repair; commits are read back, not assumed."""

import json
import os
import re
import time
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

import spamray.score
import spamray.scores_table
from spamray.cli import main
from spamray.config import ScoreConfig
from spamray.score import score
from spamray.scores_layout import input_key
from spamray.scores_table import ScoresTable
from test_scores_table import assert_every_row_once, live_files, put_bytes, table_files, write_parquet

SCORES_TABLE_DOC = Path(__file__).resolve().parents[1] / "docs" / "scores-table.md"
# A long input URL with what breaks naive paths: spaces, %, =, a quote, non-ASCII (400 characters).
LONG_FOLDER = "/".join(["nightly dump =%20 ärchive 'q' " + "x" * 150, "päth=with %2F spaces " + "y" * 150])


def sorted_frame(table: pa.Table, columns: list[str]) -> pd.DataFrame:
    frame = table.select(columns).to_pandas()
    return frame.sort_values(["source_file", "source_row"]).reset_index(drop=True)


def pyarrow_dataset_rows(url: str) -> pa.Table:
    """The Parquet files the log names, read by pyarrow with hive partitioning (no Delta reader)."""
    table = ScoresTable(url)
    paths = [f"{table.path}/{path}" for path in live_files(url)]
    return pads.dataset(paths, filesystem=table.fs, format="parquet", partitioning="hive",
                        partition_base_dir=table.path).to_table()


def duckdb_rows(url: str) -> pa.Table:
    paths = [f"{ScoresTable(url).path}/{path}" for path in live_files(url)]
    return duckdb.read_parquet(paths, hive_partitioning=True).to_arrow_table()


def assert_every_reader_agrees(url: str) -> None:
    """deltalake, Polars, Ray Data and the log's files read by pyarrow (and DuckDB, on local disk)
    return exactly the rows and columns spamray reads, with the key columns never null."""
    import ray.data

    expected_table = ScoresTable(url).read()
    columns = expected_table.column_names
    expected = sorted_frame(expected_table, columns)
    assert expected[["source_file", "source_row", "source_size", "source_version", "model_version", "run_id",
                     "input_key", "scoring"]].notna().all().all()
    readers = {"deltalake": DeltaTable(url).to_pyarrow_table(),
               "polars": pl.read_delta(url).to_arrow(),
               "ray.data": pa.Table.from_pandas(ray.data.read_delta(url).to_pandas()),
               "pyarrow": pyarrow_dataset_rows(url)}
    if ScoresTable(url).local:
        readers["duckdb"] = duckdb_rows(url)
    for name, rows in readers.items():
        assert sorted(rows.column_names) == sorted(columns), name
        pd.testing.assert_frame_equal(sorted_frame(rows, columns), expected, check_dtype=False, obj=name)


def run_readme_reading_lines(url: str) -> None:
    """Each line of docs/scores-table.md's "Reading it" block, on this table."""
    block = SCORES_TABLE_DOC.read_text().split("Reading it:\n\n```python\n", 1)[1].split("```", 1)[0]
    names = {}
    exec(block.replace("s3://bucket/scores", url), names)
    assert len(names["frame"]) and names["table"].num_rows == len(names["table"]) > 0


def one_file_archive(tmp_path, texts: list[str]) -> Path:
    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"text": texts}), archive / "a.parquet")
    return archive


@pytest.fixture
def small_writes(monkeypatch):
    """Writer tasks that write every 64 rows: several data files per input, for compaction to merge."""
    monkeypatch.setattr(spamray.score, "WRITE_BATCH_ROWS", 64)


def test_every_reader_reads_the_table_alike_before_and_after_compaction_z_order_and_vacuum(
        ray_local, model_url, sms_messages, place, small_writes):
    long_name = f"archive/{LONG_FOLDER}/mail 100%=é.parquet"
    assert len(place.join(long_name)) > 400
    inputs = {"a": write_parquet(place, "archive/a.parquet", sms_messages[:300]),
              "b": write_parquet(place, "archive/b.parquet", sms_messages[300:500]),
              "long": write_parquet(place, long_name, sms_messages[500:700])}
    out = place.join("scores")
    cfg = ScoreConfig(model=model_url, input=place.join("archive"), output=out, incremental=True, batch_size=16)
    first = score(cfg)
    assert first.files_scored == 3 and not first.files_failed
    assert all(len(name.encode()) <= 255 for path in table_files(out) for name in path.split("/"))
    assert DeltaTable(out).protocol().min_reader_version == 1 and DeltaTable(out).protocol().min_writer_version == 2
    per_input = {key: len(scored.files) for key, scored in ScoresTable(out).read_state().inputs.items()}
    assert min(per_input.values()) >= 3  # several data files each: compaction has work to do
    assert_every_reader_agrees(out)

    # Delta's own maintenance, as an operator would run it
    DeltaTable(out).optimize.compact()
    DeltaTable(out).optimize.z_order(["source_row"])
    DeltaTable(out).vacuum()  # the default retention
    compacted = ScoresTable(out).read_state()
    assert {key: len(scored.files) for key, scored in compacted.inputs.items()} == dict.fromkeys(per_input, 1)
    assert_every_reader_agrees(out)

    # Another run's files, still scoring (named by no version yet): nothing of this run deletes them.
    other_run = "input_key=0123/scoring=abcd-20991231T000000-other/part-20991231T000000-other-1.parquet"
    put_bytes(place, f"scores/{other_run}", b"a file of a run still writing")

    # The next night: one input unchanged, one changed, one new, one broken
    time.sleep(1.1)  # a new modification time on local disk, a new etag on S3
    write_parquet(place, "archive/b.parquet", sms_messages[800:850])
    inputs["c"] = write_parquet(place, "archive/c.parquet", sms_messages[900:1000])
    broken = put_bytes(place, "archive/broken.parquet", b"PAR1 not really")
    night = score(cfg)
    assert night.files_scored == 2 and list(night.files_failed) == [broken]
    assert night.data_files_removed == 1  # b's compacted file, by its decoded path
    expected = {inputs["a"]: 300, inputs["b"]: 50, inputs["long"]: 200, inputs["c"]: 100}
    assert_every_row_once(out, expected)
    assert other_run in table_files(out)
    assert_every_reader_agrees(out)
    run_readme_reading_lines(out)
    ScoresTable(out).vacuum_removed(0)  # what a run's own vacuum deletes: replaced files, never unnamed ones
    assert other_run in table_files(out)
    assert_every_reader_agrees(out)

    # And the night after: nothing changed, nothing to repair
    place.fs.rm(f"{place.path}/archive/broken.parquet")
    version = ScoresTable(out).read_state().version
    quiet = score(cfg)
    assert quiet.files_scored == 0 and not quiet.files_failed and ScoresTable(out).read_state().version == version
    assert_every_row_once(out, expected)


def test_the_full_vacuum_is_maintenance_with_a_floor_and_takes_only_unnamed_old_files(
        ray_local, model_url, sms_messages, tmp_path, capsys):
    archive = one_file_archive(tmp_path, sms_messages[:40])
    out = str(tmp_path / "scores")
    score(ScoreConfig(model=model_url, input=str(archive), output=out))
    killed = tmp_path / "scores" / "input_key=0123" / "scoring=abcd-20990101T000000-killed"
    killed.mkdir(parents=True)
    old, fresh = killed / "part-old.parquet", killed / "part-fresh.parquet"
    for file in (old, fresh):
        pq.write_table(pa.table({"x": [1]}), file)
    two_days_ago = time.time() - 48 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    for path in live_files(out):  # the table's own files are as old: a vacuum must still keep them
        os.utime(tmp_path / "scores" / path, (two_days_ago, two_days_ago))

    assert main(["vacuum", "--output", out, "--retention-hours", "1"]) == 1
    assert "at least 24 hours" in capsys.readouterr().err and old.exists()
    assert main(["vacuum", "--output", out, "--retention-hours", "24"]) == 0
    assert not old.exists() and fresh.exists()
    assert live_files(out) <= table_files(out).keys()
    assert ScoresTable(out).read().num_rows == 40


def test_a_commit_reported_as_failed_that_landed_is_reported_as_committed(
        ray_local, model_url, sms_messages, tmp_path, monkeypatch):
    archive = one_file_archive(tmp_path, sms_messages[:30])
    real_commit = ScoresTable._commit_once

    def lands_then_fails(self, *args, **kwargs):
        real_commit(self, *args, **kwargs)
        raise CommitFailedError("the answer was lost on the way back")

    monkeypatch.setattr(ScoresTable, "_commit_once", lands_then_fails)
    out = str(tmp_path / "scores")
    summary = score(ScoreConfig(model=model_url, input=str(archive), output=out))  # the default mode, not incremental
    assert summary.table_version == 1 and summary.files_scored == 1 and summary.rows_written == 30
    assert ScoresTable(out).read().num_rows == 30 and table_files(out).keys() == live_files(out)


def test_a_store_that_lets_another_commit_take_the_version_is_caught(ray_local, model_url, sms_messages, tmp_path,
                                                                     monkeypatch):
    archive = one_file_archive(tmp_path, sms_messages[:30])
    out = str(tmp_path / "scores")
    real_commit = ScoresTable._commit_once

    def overwritten(self, state, *args, **kwargs):
        # A store without conditional writes: another writer's commit replaces this one's version.
        real_commit(self, state, *args, **kwargs)
        log = Path(self.path) / "_delta_log" / f"{state.version + 1:020d}.json"
        log.write_text(json.dumps({"commitInfo": {"operation": "WRITE", "spamray": json.dumps({"run_id": "another"})}}) + "\n")

    monkeypatch.setattr(ScoresTable, "_commit_once", overwritten)
    with pytest.raises(RuntimeError, match="does the store honour conditional writes"):
        score(ScoreConfig(model=model_url, input=str(archive), output=out))


def test_carried_columns_widen_across_files_and_a_file_that_cannot_be_stored_fails_alone(
        ray_local, model_url, sms_messages, tmp_path, capsys):
    archive = tmp_path / "archive"
    archive.mkdir()
    texts = sms_messages[:10]
    naive = pa.array([pd.Timestamp("2026-12-01 10:00:00.123456")] * 10, pa.timestamp("us"))
    pq.write_table(pa.table({"text": texts, "n": pa.array(range(10), pa.int32()), "at": naive}), archive / "a.parquet")
    pq.write_table(pa.table({"text": texts, "n": pa.array(range(10), pa.int64()), "at": naive}), archive / "b.parquet")
    pq.write_table(pa.table({"text": texts, "n": pa.nulls(10), "at": naive}), archive / "c.parquet")
    pq.write_table(pa.table({"text": texts, "n": [str(i) for i in range(10)], "at": naive}), archive / "d.parquet")
    out = str(tmp_path / "scores")
    assert main(["score", "--model", model_url, "--input", str(archive), "--output", out, "--keep", "n", "at"]) == 1
    printed = capsys.readouterr().out
    assert re.search(r"FAILED .*d\.parquet: column 'n' is string here but int64 in the output", printed)
    rows = ScoresTable(out).read()
    assert rows.schema.field("n").type == pa.int64() and rows.schema.field("at").type == pa.timestamp("us", tz="UTC")
    assert rows.num_rows == 30 and rows["n"].null_count == 10
    assert DeltaTable(out).protocol().min_writer_version == 2  # no timestamp_ntz: older readers open it
    assert set(rows["at"].to_pylist()) == {pd.Timestamp("2026-12-01 10:00:00.123456", tz="UTC").to_pydatetime()}
    assert input_key(str(archive / "d.parquet")) not in ScoresTable(out).read_state().inputs


def test_a_file_gone_before_the_commit_fails_the_run_and_nothing_is_committed(
        ray_local, model_url, sms_messages, tmp_path, monkeypatch):
    archive = one_file_archive(tmp_path, sms_messages[:30])
    out = str(tmp_path / "scores")
    real_check = ScoresTable.check_files_exist

    def vacuumed_first(self, output, plan):
        # A full vacuum run by hand at too short a retention, while this run was scoring.
        self.delete([file.path for files in output.files.values() for file in files])
        real_check(self, output, plan)

    monkeypatch.setattr(ScoresTable, "check_files_exist", vacuumed_first)
    with pytest.raises(RuntimeError, match="is gone or changed before the commit"):
        score(ScoreConfig(model=model_url, input=str(archive), output=out))
    assert ScoresTable(out).read_state().inputs == {} and ScoresTable(out).read().num_rows == 0


def test_a_delta_table_of_another_layout_is_refused_with_what_to_do(tmp_path):
    other = pa.schema([("source_row", pa.int64()), ("source_file", pa.string()), ("run_id", pa.string())])
    DeltaTable.create(str(tmp_path / "scores"), other, partition_by=["source_file", "run_id"])
    with pytest.raises(ValueError, match="not a spamray scores table .*partitioned by input_key.*choose another --output"):
        ScoresTable(str(tmp_path / "scores")).read_state()


def unreadable_log(monkeypatch):
    """The store stalls on reads of the log's entries (503 SlowDown past the SDK's retries)."""
    def slow_down(self, version):
        raise OSError(f"Please reduce your request rate (reading version {version} of the log)")

    monkeypatch.setattr(ScoresTable, "commit_info", slow_down)


def test_a_commit_that_cannot_be_read_back_keeps_its_files_and_says_so_in_one_line(
        ray_local, model_url, sms_messages, tmp_path, monkeypatch, capsys):
    archive = one_file_archive(tmp_path, sms_messages[:30])
    out = str(tmp_path / "scores")
    args = ["score", "--model", model_url, "--input", str(archive), "--output", out, "--incremental"]
    assert main(args) == 0
    pq.write_table(pa.table({"text": sms_messages[30:50]}), archive / "b.parquet")
    with monkeypatch.context() as patched:
        unreadable_log(patched)
        assert main(args) == 1
    printed = capsys.readouterr().err
    error = [line for line in printed.splitlines() if line.startswith("spamray")]  # (Ray's own lines aside)
    assert len(error) == 1 and "whether it landed is unknown" in error[0] and "files are kept" in error[0], error
    assert "Traceback" not in printed
    # The commit had landed: every file it names is there, and the next night reads and builds on it.
    assert live_files(out) <= table_files(out).keys()
    assert_every_row_once(out, {str(archive / "a.parquet"): 30, str(archive / "b.parquet"): 20})
    assert main(args) == 0
    assert_every_row_once(out, {str(archive / "a.parquet"): 30, str(archive / "b.parquet"): 20})


def test_a_commit_reported_as_failed_whose_log_cannot_be_read_keeps_its_files(
        ray_local, model_url, sms_messages, tmp_path, monkeypatch):
    archive = one_file_archive(tmp_path, sms_messages[:30])
    out = str(tmp_path / "scores")

    def fails(self, *args, **kwargs):
        unreadable_log(monkeypatch)
        raise CommitFailedError("the answer was lost on the way back")

    monkeypatch.setattr(ScoresTable, "_commit_once", fails)
    with pytest.raises(spamray.scores_table.CommitUnknown, match="whether it landed is unknown"):
        score(ScoreConfig(model=model_url, input=str(archive), output=out))
    assert table_files(out)  # kept: a request still under way could have landed
    monkeypatch.undo()
    assert score(ScoreConfig(model=model_url, input=str(archive), output=out, incremental=True)).rows_written == 30
    assert_every_row_once(out, {str(archive / "a.parquet"): 30})
