"""Bulk scoring through Ray Data: same predictions as in-process, every row once, whole outputs."""

import os
import shutil
import time

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import spamray
import spamray.score
from spamray import TextClassifier
from spamray.cli import main
from spamray.config import ScoreConfig
from spamray.inputs import InputFile, list_input_files
from spamray.replica import Scorer, tokenize_batch
from spamray.score import score
from spamray.scores_audit import audit_written
from spamray.scores_layout import WrittenFile, input_key, scoring_digest
from spamray.scores_table import ScoresTable
from conftest import SPAMRAY, spamray_process


@pytest.fixture
def mixed_archive(tmp_path, sms_messages):
    """Parquet and CSV files with short, long, 5,000-token, null, empty, blank, emoji/CJK,
    undecodable and duplicated-id messages."""
    folder = tmp_path / "archive"
    folder.mkdir()
    long_text = " ".join(sms_messages[:400])  # far over 5,000 tokens
    special = ["", "   \t ", "🎉 Congrats!! 你赢了 ¥1000, reply YES 📱", long_text, "ok", "ok"]
    pq.write_table(pa.table({"msg_id": [f"p{i}" for i in range(300)] + ["dup", "dup"],
                             "text": sms_messages[:300] + [None, sms_messages[5]],
                             "sender": ["a"] * 302}), folder / "part-1.parquet")
    pq.write_table(pa.table({"msg_id": [f"q{i}" for i in range(len(special))], "text": special,
                             "sender": ["b"] * len(special)}), folder / "part-2.parquet")
    rows = pd.DataFrame({"msg_id": [f"c{i}" for i in range(200)] + ["dup"],
                         "text": sms_messages[1000:1200] + ['a "quoted",\nmulti-line message'], "sender": "c"})
    csv_bytes = rows.to_csv(index=False).encode()
    csv_bytes += b'c999,"bad bytes \xff\xfe here",c\n'  # not UTF-8: one row marked, not the file
    (folder / "part-3.csv").write_bytes(csv_bytes)
    return folder


def read_output(url):
    return ScoresTable(url).read().to_pandas()


def unreferenced_files(url):
    """Data files in the table folder that its latest version does not name."""
    table = ScoresTable(url)
    live = {path for scored in table.read_state().inputs.values() for path in scored.files}
    files = table.fs.glob(f"{table.path}/input_key=*/scoring=*/*.parquet")
    return [p for p in files if p[len(table.path) + 1:] not in live]


def test_pipeline_equals_the_in_process_classifier_row_by_row(ray_local, model_url, mixed_archive, place):
    # On local disk, and with archive, model and table all on the S3 endpoint.
    archive = place.upload(mixed_archive, "archive") if place.url.startswith("s3://") else str(mixed_archive)
    model = place.upload(model_url, "model") if place.url.startswith("s3://") else model_url
    out = place.join("scores")
    summary = score(ScoreConfig(model=model, input=archive, output=out, id_column="msg_id", precision="fp32",
                                keep=["sender"], batch_size=32, read_batch_rows=100))  # (bf16: test_precision.py)
    frame = read_output(out)
    frame["source_file"] = frame["source_file"].str.replace(archive, str(mixed_archive), regex=False)
    assert len(frame) == summary.rows_written == summary.rows_read == 302 + 6 + 202
    assert not frame.duplicated(["source_file", "source_row"]).any()
    assert (frame["msg_id"] == "dup").sum() == 3  # duplicated ids are all kept, each its own row
    by_id = frame.set_index(["source_file", "source_row"]).sort_index()
    statuses = frame.set_index("msg_id")["status"]
    assert statuses["q0"] == "empty" and statuses["q1"] == "empty" and statuses["q3"] == "truncated"
    assert statuses["c999"] == "undecodable"
    null_row = by_id.loc[(str(mixed_archive / "part-1.parquet"), 300)]
    assert null_row["status"] == "null" and null_row["msg_id"] == "dup"
    assert summary.rows_per_status == frame["status"].value_counts().to_dict()
    assert set(frame["run_id"]) == {summary.run_id} and (frame["source_size"] > 0).all()
    unscored = frame[~frame["status"].isin(["ok", "truncated"])]
    assert len(unscored) == 4 and unscored[["label", "p_spam"]].isna().all().all()

    classifier = TextClassifier.load(model_url)
    inputs = pd.concat([pd.read_parquet(mixed_archive / "part-1.parquet").assign(source_file=str(mixed_archive / "part-1.parquet")),
                        pd.read_parquet(mixed_archive / "part-2.parquet").assign(source_file=str(mixed_archive / "part-2.parquet"))])
    inputs["source_row"] = inputs.groupby("source_file").cumcount()
    csv_rows = pd.read_csv(mixed_archive / "part-3.csv", encoding_errors="replace", keep_default_na=False)
    scored = frame[frame["status"].isin(["ok", "truncated"])]
    texts = dict(zip(zip(inputs["source_file"], inputs["source_row"]), inputs["text"]))
    texts.update({(str(mixed_archive / "part-3.csv"), i): t for i, t in enumerate(csv_rows["text"][:201])})
    for row in scored.itertuples():
        alone = classifier.predict([texts[(row.source_file, row.source_row)]])[0]  # the message by itself
        assert row.label == alone.label
        assert abs(row.p_spam - alone.probs["spam"]) <= 1e-5 and abs(row.p_not_spam - alone.probs["not spam"]) <= 1e-5
    assert set(frame["sender"]) == {"a", "b", "c"} and frame["model_version"].nunique() == 1


# `spamray score` in a process of its own whose replicas are killed (SIGKILL, as a crash in native
# code or the out-of-memory killer would) while scoring a batch that holds row KILL_ROW of the
# file KILL_FILE: every time, or once when KILL_ONCE_MARKER names a file. A test-only change made
# in that process, not an option. Each kill is logged to KILLS_LOG.
SCORE_KILLING_REPLICAS = """
import os, signal, sys
import spamray.score

class KillingScorer(spamray.score.Scorer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        score = self.classifier.score_token_ids
        def score_or_die(*args, **kwargs):
            rows = zip(self.batch["source_file"].to_pylist(), self.batch["source_row"].to_pylist())
            marker = os.environ.get("KILL_ONCE_MARKER")
            if (os.environ["KILL_FILE"], int(os.environ["KILL_ROW"])) in {(f.rsplit("/", 1)[-1], r) for f, r in rows} \\
                    and not (marker and os.path.exists(marker)):
                with open(os.environ["KILLS_LOG"], "a") as log:
                    log.write("killed\\n")
                if marker:
                    open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return score(*args, **kwargs)
        self.classifier.score_token_ids = score_or_die

    def __call__(self, batch):
        self.batch = batch
        return super().__call__(batch)

spamray.score.Scorer = KillingScorer
""" + SPAMRAY


def score_killing_replicas(model_url, archive, out, tmp_path, once: bool):
    env = {"KILL_FILE": "part-1.parquet", "KILL_ROW": "40", "KILLS_LOG": str(tmp_path / "kills.log")}
    if once:
        env["KILL_ONCE_MARKER"] = str(tmp_path / "killed-once")
    run = spamray_process(SCORE_KILLING_REPLICAS, ["score", "--model", model_url, "--input", archive, "--output", out,
                                                   "--batch-size", "16", "--read-batch-rows", "50",
                                                   "--cpus-per-replica", "1"], **env)
    stdout, stderr = run.communicate(timeout=300)
    kills = (tmp_path / "kills.log").read_text().count("killed") if (tmp_path / "kills.log").exists() else 0
    return run.returncode, stdout + stderr, kills


@pytest.mark.slow
def test_a_replica_killed_once_loses_nothing(model_url, mixed_archive, tmp_path):
    out = str(tmp_path / "scores")
    code, output, kills = score_killing_replicas(model_url, str(mixed_archive), out, tmp_path, once=True)
    assert (code, kills) == (0, 1), output[-3000:]  # the batch went to the restarted replica
    frame = read_output(out)
    assert len(frame) == 510 and not frame.duplicated(["source_file", "source_row"]).any()
    assert unreferenced_files(out) == []


@pytest.mark.slow
def test_a_batch_that_kills_every_replica_fails_its_file_after_bounded_restarts(model_url, mixed_archive, tmp_path):
    # Ray Data restarts replicas and retries their batches without limit: without a bound this
    # run would never end.
    out = str(tmp_path / "scores")
    code, output, kills = score_killing_replicas(model_url, str(mixed_archive), out, tmp_path, once=False)
    assert code == 1 and kills == spamray.replica.MAX_BATCH_CRASHES, output[-3000:]
    failed = next(line for line in output.splitlines() if line.startswith("FAILED"))
    assert "part-1.parquet" in failed and "killed the model replica scoring them 3 times" in failed
    first, last = map(int, failed.split("rows ")[1].split(" ")[0].split("-"))
    assert first <= 40 <= last and last - first < 16  # the rows of the batch that killed it
    frame = read_output(out)  # the other files are committed, nothing of part-1
    assert sorted(set(frame["source_file"].str.rsplit("/", n=1).str[-1])) == ["part-2.parquet", "part-3.csv"]
    assert len(frame) == 510 - 302 and unreferenced_files(out) == []  # all rows but part-1's 302


def test_a_model_overwritten_as_the_run_starts_fails_the_run_rather_than_mix_versions(
        ray_local, model_url, sms_messages, tmp_path, monkeypatch, capsys):
    # Retrained to the same URL after the run recorded its model version, before its replicas
    # load it: no row may be scored by a model other than the one the run records.
    model = tmp_path / "model"
    shutil.copytree(model_url, model)
    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"text": sms_messages[:300]}), archive / "a.parquet")
    recorded = TextClassifier.load(str(model)).version
    retrained = TextClassifier.load(str(model))
    torch.nn.init.normal_(retrained.gpt.out_head.weight)
    retrained.save(str(tmp_path / "retrained"))
    new_version = TextClassifier.load(str(tmp_path / "retrained")).version
    real_pipeline = spamray.score.scoring_pipeline

    def retrain_then_start(*args):
        retrained.save(str(model), overwrite=True)
        return real_pipeline(*args)

    monkeypatch.setattr(spamray.score, "scoring_pipeline", retrain_then_start)
    out = str(tmp_path / "scores")
    args = ["score", "--model", str(model), "--input", str(archive), "--output", out, "--replicas", "2",
            "--cpus-per-replica", "1", "--incremental"]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert recorded != new_version
    assert f"the run recorded model version {recorded}, a replica loaded {new_version}" in error
    assert len(read_output(out)) == 0 and unreferenced_files(out) == []

    monkeypatch.setattr(spamray.score, "scoring_pipeline", real_pipeline)
    assert main(args) == 0  # run again: every row with the new model
    assert set(read_output(out)["model_version"]) == {new_version} and len(read_output(out)) == 300


def test_output_streams_out_in_files_of_bounded_size(ray_local, model_url, sms_messages, tmp_path, monkeypatch):
    # What keeps memory flat as archives grow: replicas pass their output on in small blocks,
    # and each writer task writes what it gathered, instead of a whole input file at once.
    monkeypatch.setattr(spamray.score, "OUTPUT_BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(spamray.score, "WRITE_BATCH_ROWS", 400)
    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"text": sms_messages[:2000]}), archive / "one.parquet")
    out = tmp_path / "scores"
    score(ScoreConfig(model=model_url, input=str(archive), output=str(out), batch_size=200))
    files = list(out.glob("input_key=*/scoring=*/*.parquet"))
    assert len(files) >= 5 and max(pq.ParquetFile(f).metadata.num_rows for f in files) <= 1000
    assert sorted(read_output(str(out))["source_row"]) == list(range(2000))


def test_a_bf16_replica_agrees_with_fp32(model_url, sms_messages):
    rows = pa.table({"text": sms_messages[:200], "status": pa.nulls(200, pa.string())})
    batch = tokenize_batch(rows, max_length=96, keep_text=False)
    fp32 = Scorer(model_url, threads=1, model_name="m", precision="fp32")(batch)
    bf16_scorer = Scorer(model_url, threads=1, model_name="m", precision="bf16")
    assert bf16_scorer.classifier.gpt.tok_emb.weight.dtype == torch.bfloat16
    assert bf16_scorer.classifier.gpt.out_head.weight.dtype == torch.float32  # the decision in fp32
    bf16 = bf16_scorer(batch)
    p32, p16 = fp32["p_spam"].to_numpy(), bf16["p_spam"].to_numpy()
    assert 0 < abs(p32 - p16).max() < 0.02  # bf16 really ran, and stayed close
    confident = abs(p32 - 0.5) > 0.02
    assert (fp32["label"].to_numpy()[confident] == bf16["label"].to_numpy()[confident]).all()


def test_incremental_runs_score_only_new_or_changed_files(ray_local, model_url, sms_messages, tmp_path):
    archive, out = tmp_path / "archive", str(tmp_path / "scores")
    archive.mkdir()
    pq.write_table(pa.table({"text": sms_messages[:100]}), archive / "day-1.parquet")
    pq.write_table(pa.table({"text": sms_messages[100:150]}), archive / "day-2.parquet")
    cfg = ScoreConfig(model=model_url, input=str(archive), output=out, incremental=True)
    assert score(cfg).rows_written == 150
    again = score(cfg)
    assert again.files_scored == 0 and again.rows_written == 0
    pq.write_table(pa.table({"text": sms_messages[150:180]}), archive / "day-3.parquet")
    third = score(cfg)
    assert third.files_scored == 1 and third.rows_written == 30
    frame = read_output(out)
    assert len(frame) == 180 and not frame.duplicated(["source_file", "source_row"]).any()
    # A file rewritten in place: its old rows are replaced, not duplicated.
    time.sleep(0.01)
    pq.write_table(pa.table({"text": sms_messages[200:260]}), archive / "day-2.parquet")
    assert score(cfg).rows_written == 60
    frame = read_output(out)
    assert len(frame) == 100 + 60 + 30
    assert (frame["source_file"] == str(archive / "day-2.parquet")).sum() == 60
    record = ScoresTable(out).read_state().inputs  # the log's own record of what is scored
    assert {scored.rows for scored in record.values()} == {100, 60, 30}
    day_2 = listed(archive / "day-2.parquet")
    assert record[input_key(day_2.url)].digest == scoring_digest(day_2.size, day_2.version, TextClassifier.load(model_url).version)
    assert set(frame.query("source_file == @day_2.url")["source_size"]) == {day_2.size}


def test_a_second_full_run_needs_overwrite(ray_local, model_url, sms_messages, tmp_path):
    archive, out = tmp_path / "archive", str(tmp_path / "scores")
    archive.mkdir()
    pq.write_table(pa.table({"text": sms_messages[:20]}), archive / "a.parquet")
    score(ScoreConfig(model=model_url, input=str(archive), output=out))
    with pytest.raises(FileExistsError, match="--overwrite"):
        score(ScoreConfig(model=model_url, input=str(archive), output=out))
    pq.write_table(pa.table({"text": sms_messages[:30]}), archive / "a.parquet")
    score(ScoreConfig(model=model_url, input=str(archive), output=out, overwrite=True))
    assert len(read_output(out)) == 30


def test_bad_input_fails_before_any_work(ray_local, model_url, tmp_path, capsys):
    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"body": ["hi"]}), archive / "a.parquet")
    out = str(tmp_path / "scores")
    assert main(["score", "--model", model_url, "--input", str(archive), "--output", out]) == 1
    assert "a.parquet has no column 'text'; its columns are ['body']" in capsys.readouterr().err
    assert main(["score", "--model", model_url, "--input", str(tmp_path / "nowhere"), "--output", out]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["score", "--model", str(tmp_path), "--input", str(archive), "--output", out,
                 "--text-column", "body"]) == 1
    assert "is not a spamray classifier" in capsys.readouterr().err
    assert not os.path.exists(out)


def written_rows(folder, parts):
    """Writes data files, one per part (source_file, source_rows, statuses), as writer tasks do."""
    folder.mkdir()
    files = {}
    for index, (source, rows, statuses) in enumerate(parts):
        pq.write_table(pa.table({"source_row": rows, "status": statuses,
                                 "label": [("spam" if s == "ok" else None) for s in statuses]}),
                       folder / f"part-{index}.parquet")
        files.setdefault(source, []).append(WrittenFile(f"part-{index}.parquet", source, len(rows), 1, "{}"))
    return str(folder), files


def listed(path) -> InputFile:
    """An input file as the run's listing records it."""
    return list_input_files(str(path))[0][0]


def csv_inputs(folder, *names) -> list[InputFile]:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_text("text\nhello\n")
    return [listed(folder / name) for name in names]


def test_the_audit_counts_rows_spread_over_written_files(tmp_path):
    a, b = csv_inputs(tmp_path / "in", "a.csv", "b.csv")
    root, files = written_rows(tmp_path / "table", [(a.url, [2, 0], ["ok", "empty"]),
                                                    (a.url, [1], ["ok"]), (b.url, [0], ["null"])])
    audit = audit_written(fsspec.filesystem("file"), root, files, [a, b], batch_rows=1)
    assert audit.rows_per_file == {a.url: 3, b.url: 1} and audit.rows_written == 4 and audit.file_errors == {}
    assert audit.rows_per_status == {"ok": 2, "empty": 1, "null": 1}
    assert audit.rows_per_label == {"spam": 2, "None": 2}


@pytest.mark.parametrize("parts, problem", [
    ([([0, 1], ["ok"] * 2), ([1], ["ok"])], "a row is there twice"),
    ([([0, 0], ["ok"] * 2)], "a row is there twice"),
    ([([0, 2], ["ok"] * 2)], "1 of rows 0..2 are missing"),
    ([([-1], ["ok"])], "negative source_row"),
])
def test_the_audit_refuses_rows_lost_or_repeated(tmp_path, parts, problem):
    a, = csv_inputs(tmp_path / "in", "a.csv")
    root, files = written_rows(tmp_path / "table", [(a.url, *part) for part in parts])
    with pytest.raises(RuntimeError, match=problem):
        audit_written(fsspec.filesystem("file"), root, files, [a])


def test_an_input_that_changed_under_the_run_is_that_files_error_and_the_others_stand(tmp_path):
    stable, rewritten = csv_inputs(tmp_path / "in", "stable.csv", "rewritten.csv")
    source = tmp_path / "in" / "in.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), source)
    short = listed(source)
    root, files = written_rows(tmp_path / "table", [(short.url, [0, 1], ["ok"] * 2), (stable.url, [0], ["ok"]),
                                                    (rewritten.url, [0], ["ok"])])
    time.sleep(0.01)
    (tmp_path / "in" / "rewritten.csv").write_text("text\nhello\nagain\n")  # between the listing and the audit
    audit = audit_written(fsspec.filesystem("file"), root, files, [short, stable, rewritten])
    assert audit.rows_per_file == {stable.url: 1} and audit.rows_written == 1
    assert "has 3 rows but 2 were scored" in audit.file_errors[short.url]
    assert "changed while the run scored it" in audit.file_errors[rewritten.url]


def test_a_batch_is_refused_for_its_own_crashes_not_for_the_retries_of_its_task():
    # One replica task carried two batches, of two input files; the second kills its replica
    # each time, and Ray retries the whole task: the first batch starts again every time.
    from spamray.driver_actors import BatchCrashes

    crashes, first, killer = BatchCrashes(), "a.parquet:0:b.parquet:5:16", "b.parquet:6:b.parquet:21:16"
    refused = []
    for attempt in range(spamray.replica.MAX_BATCH_CRASHES + 1):
        for batch in (first, killer):
            if crashes.start(batch) >= spamray.replica.MAX_BATCH_CRASHES:
                refused.append(batch)
            elif batch == killer:
                break  # the replica died scoring it: no finish
            crashes.finish(batch)
    assert refused == [killer]  # the first batch, and a.parquet with it, commits


def test_thresholds_that_differ_past_six_digits_are_different_scorings(ray_local, model_url, sms_messages, tmp_path):
    # Low false-positive targets put thresholds at 0.99999..., where `:g` kept six digits.
    archive, out = tmp_path / "archive", str(tmp_path / "scores")
    archive.mkdir()
    pq.write_table(pa.table({"text": sms_messages[:20]}), archive / "a.parquet")
    first = score(ScoreConfig(model=model_url, input=str(archive), output=out, incremental=True, threshold=0.9999971))
    second = score(ScoreConfig(model=model_url, input=str(archive), output=out, incremental=True, threshold=0.9999974))
    assert second.files_scored == 1 and second.table_version == first.table_version + 1
    assert set(read_output(out)["model_version"]) == {f"{TextClassifier.load(model_url).version}-t0.9999974"}
