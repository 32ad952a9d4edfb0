"""The scores output as a Delta Lake table, tried the way nightly runs fail: on local disk and on a
loopback S3 endpoint, with runs that overlap, drivers killed mid-write and mid-commit, and
archives full of broken, empty, compressed and foreign files."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

import spamray
from conftest import SPAMRAY, spamray_process
from spamray import TextClassifier
from spamray.cli import main
from spamray.config import ScoreConfig
from spamray.inputs import InputFile, read_chunks
from spamray.score import score
from spamray.scores_layout import (CommitPlan, RunOutput, ScoredInput, TableState, WrittenFile, input_key, plan_commit,
                                   scoring_digest)
from spamray.scores_table import ScoresTable
from spamray.table_files import write_data_files


def put_bytes(place, name, data: bytes) -> str:
    place.fs.makedirs(f"{place.path}/{name}".rsplit("/", 1)[0], exist_ok=True)
    place.fs.pipe_file(f"{place.path}/{name}", data)
    return place.join(name)


def write_parquet(place, name, texts):
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), buffer)
    return put_bytes(place, name, buffer.getvalue().to_pybytes())


def read_frame(url, version=None):
    return ScoresTable(url).read(version=version).to_pandas()


def assert_every_row_once(url, expected_rows: dict[str, int]):
    """The table holds rows 0..n-1 of each input exactly once, and every file it names exists."""
    frame = read_frame(url)
    assert not frame.duplicated(["source_file", "source_row"]).any()
    assert frame.groupby("source_file").size().to_dict() == {k: v for k, v in expected_rows.items() if v}
    for source, rows in frame.groupby("source_file")["source_row"]:
        assert sorted(rows) == list(range(expected_rows[source]))


def commit_log(table_url, version):
    """The add and remove actions of one commit, read from the transaction log itself."""
    table = ScoresTable(table_url)
    with table.fs.open(f"{table.path}/_delta_log/{version:020d}.json", "rb") as handle:
        actions = [json.loads(line) for line in handle.read().decode().splitlines() if line.strip()]
    return [a["add"] for a in actions if "add" in a], [a["remove"] for a in actions if "remove" in a]


def table_files(table_url):
    """Data files in the table folder (paths relative to it), with their sizes."""
    table = ScoresTable(table_url)
    found = table.fs.find(table.path, detail=True)
    return {p[len(table.path) + 1:]: info["size"] for p, info in found.items()
            if p.endswith(".parquet") and "/_delta_log/" not in p}


def live_files(table_url):
    return {path for scored in ScoresTable(table_url).read_state().inputs.values() for path in scored.files}


# -- incremental nights ------------------------------------------------------------------------
def test_an_incremental_night_writes_only_the_new_file(ray_local, model_url, sms_messages, place):
    for day in range(50):
        write_parquet(place, f"archive/day-{day:02d}.parquet", sms_messages[day * 10:(day + 1) * 10])
    out = place.join("scores")
    cfg = ScoreConfig(model=model_url, input=place.join("archive"), output=out, incremental=True)
    first = score(cfg)
    assert first.files_scored == 50 and first.rows_written == 500
    before = table_files(out)
    write_parquet(place, "archive/day-50.parquet", sms_messages[500:512])
    second = score(cfg)
    adds, removes = commit_log(out, second.table_version)
    assert second.files_scored == 1 and second.rows_written == 12 and removes == []
    assert {json.loads(a["stats"])["numRecords"] for a in adds} == {12}
    assert {a["partitionValues"]["input_key"] for a in adds} == {input_key(place.join("archive/day-50.parquet"))}
    after = table_files(out)
    assert {name: after[name] for name in before} == before  # nothing earlier copied, rewritten or removed
    assert second.bytes_written == sum(a["size"] for a in adds) == sum(after[n] for n in set(after) - set(before))
    assert_every_row_once(out, {place.join(f"archive/day-{d:02d}.parquet"): 10 for d in range(50)}
                          | {place.join("archive/day-50.parquet"): 12})


def test_a_changed_file_swaps_its_rows_in_one_version(ray_local, model_url, sms_messages, place):
    a = write_parquet(place, "archive/a.parquet", sms_messages[:30])
    b = write_parquet(place, "archive/b.parquet", sms_messages[30:50])
    out = place.join("scores")
    cfg = ScoreConfig(model=model_url, input=place.join("archive"), output=out, incremental=True)
    first = score(cfg)
    earlier = read_frame(out).sort_values(["source_file", "source_row"]).reset_index(drop=True)
    old_b_files = ScoresTable(out).read_state().inputs[input_key(b)].files
    time.sleep(1.1)  # a new modification time on local disk, a new etag on S3
    write_parquet(place, "archive/b.parquet", sms_messages[100:105])
    second = score(cfg)
    assert second.files_scored == 1 and second.table_version == first.table_version + 1
    adds, removes = commit_log(out, second.table_version)  # old rows out, new rows in: one commit
    assert {r["path"] for r in removes} == set(old_b_files) and {a["partitionValues"]["input_key"] for a in adds} == {input_key(b)}
    assert_every_row_once(out, {a: 30, b: 5})
    assert read_frame(out).query("source_file == @b")["run_id"].unique().tolist() == [second.run_id]
    then = read_frame(out, version=first.table_version).sort_values(["source_file", "source_row"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(then, earlier)  # the version before still reads as it was


# -- killed drivers and overlapping runs (real processes) ---------------------------------------
# `spamray score` in a process of its own; test-only changes made in that process, never options.
# Small writer batches: data files appear early, so a kill can land while they are being written.
SCORE = """
import os, signal, sys, threading
import spamray.score, spamray.scores_table as scores_table
spamray.score.WRITE_BATCH_ROWS = 64
if os.environ.get("DIE_IN_COMMIT_AFTER_S"):
    real_commit = scores_table.ScoresTable._commit_once
    def commit_and_die(self, *args, **kwargs):
        # the whole process group, as a lost machine would: the driver and its local Ray alike
        die = lambda: os.killpg(os.getpgid(0), signal.SIGKILL)
        threading.Timer(float(os.environ["DIE_IN_COMMIT_AFTER_S"]), die).start()
        real_commit(self, *args, **kwargs)
        die()
    scores_table.ScoresTable._commit_once = commit_and_die
""" + SPAMRAY


def score_command(model_url, archive, out, *extra):
    return ["score", "--model", model_url, "--input", archive, "--output", out, "--incremental", "--batch-size", "16",
            "--read-batch-rows", "50", "--cpus-per-replica", "1", *extra]


def spamray_score(args, **extra_env):
    return spamray_process(SCORE, args, stdout=subprocess.DEVNULL, **extra_env)


@pytest.mark.parametrize("moment", ["while writing", "during the commit"])
def test_a_killed_run_leaves_the_table_as_it_was(ray_local, model_url, sms_messages, place, moment):
    first_day = write_parquet(place, "archive/day-0.parquet", sms_messages[:40])
    out = place.join("scores")
    args = score_command(model_url, place.join("archive"), out)
    score(ScoreConfig(model=model_url, input=place.join("archive"), output=out, incremental=True))
    before, version = read_frame(out), ScoresTable(out).read_state().version
    # 1,800 new rows in 16-row batches and 64-row writes: dozens of data files are written over
    # seconds, so the kill lands while writing; a commit's kill does not depend on the size.
    new_days = {write_parquet(place, f"archive/day-{d}.parquet", sms_messages[d * 600:(d + 1) * 600]): 600 for d in (1, 2, 3)}
    if moment == "while writing":
        run = spamray_score(args)
        deadline = time.time() + 240
        while time.time() < deadline and run.poll() is None and len(table_files(out)) <= len(live_files(out)):
            time.sleep(0.1)
        assert len(table_files(out)) > len(live_files(out)), "the run never started writing"
        os.killpg(run.pid, signal.SIGKILL)
    else:
        run = spamray_score(args, DIE_IN_COMMIT_AFTER_S="0.01")
    assert run.wait(timeout=300) == -signal.SIGKILL, run.stderr.read()[-2000:]
    state = ScoresTable(out).read_state()
    if state.version == version:  # not committed: the table reads exactly as before
        pd.testing.assert_frame_equal(read_frame(out), before)
        assert table_files(out).keys() > live_files(out)  # the killed run's files lie there, named by no version
    else:  # the commit had landed: whole, in one version
        assert state.version == version + 1
        assert_every_row_once(out, {first_day: 40, **new_days})
    assert main([*args, "--retention-hours", "0"]) == 0  # the rerun, on the suite's Ray
    assert_every_row_once(out, {first_day: 40, **new_days})
    # The killed run's files are named by no version (a run never deletes another run's files):
    # Delta's own full vacuum takes them, and the table reads as before.
    assert live_files(out) <= table_files(out).keys()
    DeltaTable(ScoresTable(out).url).vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False, full=True)
    assert table_files(out).keys() == live_files(out)
    assert_every_row_once(out, {first_day: 40, **new_days})


def test_overlapping_runs_commit_every_row_once(ray_local, model_url, sms_messages, place):
    first_day = write_parquet(place, "archive/day-0.parquet", sms_messages[:20])
    out = place.join("scores")
    score(ScoreConfig(model=model_url, input=place.join("archive"), output=out, incremental=True))
    new_days = {write_parquet(place, f"archive/day-{d}.parquet", sms_messages[d * 300:(d + 1) * 300]): 300 for d in (1, 2)}
    runs = [spamray_score(score_command(model_url, place.join("archive"), out)) for _ in range(2)]
    results = [(run.wait(timeout=400), run.stderr.read()) for run in runs]
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    assert_every_row_once(out, {first_day: 20, **new_days})
    state = ScoresTable(out).read_state()
    assert len({state.inputs[input_key(url)].run_id for url in new_days}) == 1  # one run's rows per input, never a mix
    assert live_files(out) <= set(table_files(out))  # neither run deleted a file the table names


def test_a_file_that_breaks_part_way_ends_in_a_read_error_that_the_writer_keeps_out(tmp_path):
    # Past the CSV reader's first 4 MiB block, so rows have already gone on when the error comes.
    broken = tmp_path / "big.csv"
    broken.write_bytes(b"text\n" + b"a fine message\n" * 400_000 + b'"two","columns"\n')
    chunks = list(read_chunks(str(broken), "text", {}, chunk_rows=100_000))
    assert sum(c.num_rows for c in chunks[:-1]) >= 100_000 and chunks[-1]["source_row"].to_pylist() == [-1]
    assert chunks[-1]["status"].to_pylist() == ["read_error"] and "data row 400001 (line 400002) has 2 fields, the header 1" in chunks[-1]["file_error"][0].as_py()
    rows = pa.concat_tables([chunks[0].slice(0, 5), chunks[-1]]).append_column("n_tokens", pa.array([1] * 6, pa.int32()))
    schema = pa.schema([("source_row", pa.int64()), ("status", pa.string()), ("n_tokens", pa.int32())])
    (tmp_path / "table").mkdir()
    inputs = {str(broken): InputFile(str(broken), broken.stat().st_size, "v1")}
    written = write_data_files(rows, str(tmp_path / "table"), "run-1", "m1", schema, inputs).to_pylist()
    assert [(w["rows"], w["file_error"] is None) for w in written] == [(0, False), (5, True)]
    assert pq.read_table(tmp_path / "table" / written[1]["path"]).column_names[:3] == schema.names


# -- the commit plan, without Ray ----------------------------------------------------------------
def scored(run_id, *files, size=1, version="v1", model="m1"):
    return ScoredInput(scoring_digest(size, version, model), run_id, rows=1, files={f: 10 for f in files})


def run_output(mode, *urls, failed=()):
    inputs = {url: InputFile(url, 1, "v2") for url in urls}
    return RunOutput("run-b", "m1", mode, inputs, {url: [WrittenFile(f"new-{url}", url, 1, 10, "{}")] for url in urls},
                     failed=set(failed))


def test_the_commit_plan_replaces_each_input_whole_and_drops_what_another_run_did():
    state = TableState(version=3, inputs={input_key("a"): scored("run-a", "a1", "a2"), input_key("b"): scored("run-a", "b1"),
                                          input_key("c"): scored("run-x", "c1", version="v2")})  # c: same version, other run
    plan = plan_commit(state, run_output("incremental", "a", "c", "d"))
    assert plan == CommitPlan(adds=["a", "d"], removes={"a1": 10, "a2": 10}, already_scored=["c"])
    overwrite = plan_commit(state, run_output("overwrite", "a", failed=["b"]))  # a failed input keeps its rows
    assert overwrite.adds == ["a"] and set(overwrite.removes) == {"a1", "a2", "c1"}
    with pytest.raises(FileExistsError, match="another run committed"):
        plan_commit(state, run_output("create", "a"))


# -- inputs that must not wedge the night ------------------------------------------------------------
def test_broken_empty_compressed_and_foreign_files_never_wedge_the_night(ray_local, model_url, sms_messages, place, capsys):
    good = write_parquet(place, "archive/good.parquet", sms_messages[:25])
    empty = write_parquet(place, "archive/empty.parquet", [])
    header_only = put_bytes(place, "archive/header-only.csv", b"text\n")
    zero_bytes = put_bytes(place, "archive/zero-bytes.parquet", b"")
    whole = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": sms_messages[100:130]}), whole)
    truncated = put_bytes(place, "archive/truncated.parquet", whole.getvalue().to_pybytes()[:400])
    bad_csv = put_bytes(place, "archive/bad-row.csv", b"text\nhello\n\"two\",\"columns\"\n")
    gz = put_bytes(place, "archive/dump.csv.gz", gzip.compress(pd.DataFrame({"text": sms_messages[200:215]}).to_csv(index=False).encode()))
    put_bytes(place, "archive/notes.zip", b"PK")
    write_parquet(place, "archive/_temporary/0/part-0.parquet", ["half-written"])
    write_parquet(place, "archive/.hidden/x.parquet", ["hidden"])
    out = place.join("archive/scores")  # the output table under the input path
    args = ["score", "--model", model_url, "--input", place.join("archive"), "--output", out, "--incremental"]

    assert main(args) == 1  # the scheduler sees a night that was not whole
    printed = capsys.readouterr()
    for broken in (zero_bytes, truncated, bad_csv):
        assert f"FAILED {broken}" in printed.out and broken in printed.err
    assert "notes.zip: not a file type spamray reads" in printed.out
    assert "_temporary/0/part-0.parquet: hidden or temporary path" in printed.out and ".hidden/x.parquet" in printed.out
    expected = {good: 25, gz: 15, empty: 0, header_only: 0}
    assert_every_row_once(out, expected)
    record = ScoresTable(out).read_state().inputs
    assert set(record) == {input_key(url) for url in expected} and record[input_key(empty)].rows == 0  # empty inputs: scored

    assert main(args) == 1  # the failed files are tried again (and fail again); nothing else is rescored
    printed = capsys.readouterr().out
    assert sum(line.startswith("FAILED ") for line in printed.splitlines()) == 3
    assert f"skipped {out}: the output table itself" in printed
    put_bytes(place, "archive/truncated.parquet", whole.getvalue().to_pybytes())
    place.fs.rm([f"{place.path}/archive/zero-bytes.parquet", f"{place.path}/archive/bad-row.csv"])
    assert main(args) == 0
    assert "scored 1 of 5 files" in capsys.readouterr().out
    assert_every_row_once(out, {**expected, truncated: 30})


@pytest.mark.parametrize("option, column", [("--keep", "status"), ("--keep", "label"), ("--keep", "p_spam"),
                                            ("--id-column", "source_row"), ("--keep", "run_id")])
@pytest.mark.slow
def test_an_input_column_named_like_an_output_column_is_refused_before_any_work(model_url, tmp_path, capsys, option, column):
    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"text": ["hi"], column: ["x"]}), archive / "a.parquet")
    out = tmp_path / "scores"
    assert main(["score", "--model", model_url, "--input", str(archive), "--output", str(out), option, column]) == 1
    assert f"{column!r}: the scores output writes a column of that name itself" in capsys.readouterr().err
    assert not out.exists()


def test_two_labels_that_would_share_a_probability_column_are_refused():
    with pytest.raises(ValueError, match=r"labels \['Spam!', 'spam'\] would share the output column 'p_spam'"):
        TextClassifier(spamray.load_gpt2("random", "gpt2-tiny"), ["Spam!", "spam"])


@pytest.mark.slow
def test_an_output_folder_that_is_not_a_delta_table_is_refused_and_left_alone(model_url, tmp_path, capsys):
    archive, out = tmp_path / "archive", tmp_path / "scores"
    archive.mkdir(), out.mkdir()
    pq.write_table(pa.table({"text": ["hi"]}), archive / "a.parquet")
    pq.write_table(pa.table({"x": [1]}), out / "part-0.parquet")
    assert main(["score", "--model", model_url, "--input", str(archive), "--output", str(out), "--incremental"]) == 1
    error = capsys.readouterr().err
    assert "exists and is not a Delta table; choose another --output" in error
    assert sorted(p.name for p in out.iterdir()) == ["part-0.parquet"]


READ_AND_MAINTAIN = """
import sys
from spamray.scores_table import ScoresTable
table = ScoresTable(sys.argv[1])
assert table.read().num_rows == int(sys.argv[2]) and table.read_state().version >= 1
table.vacuum_removed(168)
table.vacuum_unnamed(168)
print("ok")
"""


def test_reading_and_vacuuming_exit_zero_in_fresh_processes(ray_local, model_url, sms_messages, tmp_path):
    # deltalake's own scanner can abort a process at exit after a good read (delta-rs #2184); a
    # scheduler reads exit 134 as a failed night. spamray's reads and maintenance must not.
    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"text": sms_messages[:10]}), archive / "a.parquet")
    out = str(tmp_path / "scores")
    score(ScoreConfig(model=model_url, input=str(archive), output=out))
    codes = [subprocess.run([sys.executable, "-c", READ_AND_MAINTAIN, out, "10"], capture_output=True, timeout=120).returncode
             for _ in range(10)]
    assert codes == [0] * 10


def test_overwrite_keeps_the_rows_of_an_input_that_fails_the_up_front_check(ray_local, model_url, sms_messages, place,
                                                                           capsys):
    whole = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": sms_messages[:50]}), whole)
    a = put_bytes(place, "archive/a.parquet", whole.getvalue().to_pybytes())
    b = write_parquet(place, "archive/b.parquet", sms_messages[50:70])
    out = place.join("scores")
    args = ["score", "--model", model_url, "--input", place.join("archive"), "--output", out]
    assert main(args) == 0
    put_bytes(place, "archive/a.parquet", whole.getvalue().to_pybytes()[:300])  # truncated after that night
    write_parquet(place, "archive/b.parquet", sms_messages[100:110])
    assert main([*args, "--overwrite"]) == 1
    printed = capsys.readouterr()
    assert f"FAILED {a}" in printed.out and "nothing of it committed; the next run tries it again" in printed.out
    assert_every_row_once(out, {a: 50, b: 10})  # a's earlier rows stay, as the message says


def test_two_runs_on_one_cluster_take_turns_and_finish(ray_local, model_url, sms_messages, tmp_path):
    # Each run's replica reserved a CPU of the 2 and waited for rows that its read tasks, with no
    # CPU left for them, never read: both runs hung. Runs on one cluster now take turns.
    import threading

    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"text": sms_messages[:60]}), archive / "a.parquet")
    outputs = [str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "one")]
    summaries = {}

    def run(index, output):
        summaries[index] = score(ScoreConfig(model=model_url, input=str(archive), output=output, incremental=True,
                                             cpus_per_replica=1))

    threads = [threading.Thread(target=run, args=(i, out), daemon=True) for i, out in enumerate(outputs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "the runs hung"
    assert sorted(s.rows_written for s in summaries.values()) == [0, 60, 60]  # the same output once
    for output in set(outputs):
        assert_every_row_once(output, {str(archive / "a.parquet"): 60})
