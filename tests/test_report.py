"""`spamray report`: what each night did, read back from a scores table, against what the test
computes on its own from the inputs and from `predict`."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone

import matplotlib.image
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spamray import TextClassifier
from spamray.cli import ALERT_EXIT, main
from spamray.config import ReportConfig, ScoreConfig
from spamray.report import (PSI_BINS, AlertLimits, RunRecord, RunReport, TableReport, histogram,
                            population_stability_index, report, select_runs)
from spamray.score import score


# -- the measures, on their own -------------------------------------------------------------------
def psi_by_hand(reference: list[float], current: list[float]) -> float:
    """PSI over PSI_BINS equal bins of [0, 1], an empty bin counted as a share of 1e-4."""
    def shares(values):
        counts = [0] * PSI_BINS
        for value in values:
            counts[min(int(value * PSI_BINS), PSI_BINS - 1)] += 1
        return [max(count / len(values), 1e-4) for count in counts]

    return sum((a - e) * np.log(a / e) for e, a in zip(shares(reference), shares(current)))


def test_the_population_stability_index_is_the_textbook_sum_and_zero_for_the_same_mix():
    rng = np.random.default_rng(0)
    reference, current = rng.beta(0.5, 3, 400), rng.beta(3, 0.5, 300)
    assert population_stability_index(histogram(reference), histogram(current)) == pytest.approx(
        psi_by_hand(reference.tolist(), current.tolist()))
    assert population_stability_index(histogram(reference), histogram(reference)) == 0
    assert histogram(np.array([0.0, 0.04, 0.999, 1.0])).tolist() == [0.5] + [0.0] * (PSI_BINS - 2) + [0.5]


def a_record(run_id: str, day: int, failed: dict | None = None, spam: int = 10, ham: int = 90) -> RunRecord:
    moment = datetime(2026, 12, 1, 2, tzinfo=timezone.utc) + timedelta(days=day)
    return RunRecord(run_id=run_id, version=day + 1, started=moment, committed=moment + timedelta(seconds=50),
                     model="m", model_version="v1", precision="fp32", threshold=0.9, labels=["not spam", "spam"],
                     positive="spam", files_scored=1, files_failed=failed or {}, files_skipped=0, rows=spam + ham + 1,
                     rows_per_status={"ok": spam + ham, "empty": 1},
                     rows_per_label={"spam": spam, "not spam": ham, "None": 1})


def test_a_records_share_rate_and_the_alerts_each_limit_raises():
    first, failing, shifted = a_record("r0", 0), a_record("r1", 1, {"s3://a/x.csv": "not CSV"}), a_record("r2", 2, spam=60, ham=40)
    assert first.positive_share == 0.1 and shifted.positive_share == 0.6  # the unscored row counts in neither
    assert first.rows_per_second == pytest.approx(101 / 50)
    reference = RunReport(first, 100, [], None, None)
    runs = [reference, RunReport(failing, 100, [], 0.05, 0.0), RunReport(shifted, 100, [], 0.9, 0.5)]
    result = TableReport("t", "spam", reference, runs)
    assert result.alerts(AlertLimits()) == []
    assert [line.split(":")[0] for line in result.alerts(AlertLimits(max_psi=0.25))] == ["r2"]
    assert [line.split(":")[0] for line in result.alerts(AlertLimits(max_failed_files=0))] == ["r1"]
    assert [line.split(":")[0] for line in result.alerts(AlertLimits(max_share_change=0.05))] == ["r2"]
    assert list(result.to_json()["runs"]) == ["r0", "r1", "r2"]
    assert select_runs([first, failing, shifted], first.committed + timedelta(hours=1), None) == [failing, shifted]
    assert select_runs([first, failing, shifted], None, 1) == [shifted]


def test_a_commit_that_is_not_a_run_is_not_reported_and_bad_options_are_refused(tmp_path, capsys):
    assert RunRecord.from_commit({"version": 3, "timestamp": 0, "operation": "OPTIMIZE"}) is None
    with pytest.raises(ValueError, match="--last 0"):
        ReportConfig(table="t", last=0)
    with pytest.raises(ValueError, match="--out"):
        ReportConfig(table="t", html=True)
    assert main(["report", "t", "--since", "yesterday"]) == 1
    assert main(["report", str(tmp_path / "nothing-here")]) == 1
    assert "holds no Delta table" in capsys.readouterr().err


# -- nights of a real table, local and on S3 ------------------------------------------------------
def night_files(prepared_sms: str) -> dict[str, pd.DataFrame]:
    """Three nights of messages from the prepared training split: two of mostly ham, a third of
    mostly spam (a shifted mix)."""
    frame = pd.read_parquet(f"{prepared_sms}/train.parquet")
    ham, spam = frame[frame.label == 0].sample(frac=1, random_state=0), frame[frame.label == 1].sample(frac=1, random_state=0)
    return {"n1.parquet": pd.concat([ham[:200], spam[:25]]), "n2.parquet": pd.concat([ham[200:400], spam[25:50]]),
            "n3.csv": pd.concat([ham[400:425], spam[50:250]])}


def put(place, name: str, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    if name.endswith(".csv"):
        frame[["text"]].to_csv(buffer, index=False)
    else:
        pq.write_table(pa.table({"text": frame["text"].tolist()}), buffer)
    place.fs.makedirs(f"{place.path}/archive", exist_ok=True)
    place.fs.pipe_file(f"{place.path}/archive/{name}", buffer.getvalue())


def test_a_report_of_three_nights_matches_the_inputs_and_predict(ray_local, place, trained_enough, prepared_sms):
    nights, table = night_files(prepared_sms), place.join("scores")
    classifier = TextClassifier.load(trained_enough)
    predicted = {name: classifier.predict(frame["text"].tolist()) for name, frame in nights.items()}
    spam_share = {name: np.mean([p.label == "spam" for p in ps]) for name, ps in predicted.items()}
    probabilities = {name: [p.probs["spam"] for p in ps] for name, ps in predicted.items()}
    psi = {name: psi_by_hand(probabilities["n1.parquet"], probabilities[name]) for name in nights}
    assert max(psi["n1.parquet"], psi["n2.parquet"]) * 3 < psi["n3.csv"], psi  # the third night is the shift
    limit = (psi["n2.parquet"] + psi["n3.csv"]) / 2

    run_ids, exits = [], []
    for name, frame in nights.items():
        put(place, name, frame)
        if name == "n2.parquet":
            place.fs.pipe_file(f"{place.path}/archive/broken.parquet", b"PAR1 not a footer")
        if name == "n3.csv":
            place.fs.rm(f"{place.path}/archive/broken.parquet")
        summary = score(ScoreConfig(model=trained_enough, input=place.join("archive"), output=table, incremental=True,
                                    precision="fp32"))
        run_ids.append(summary.run_id)
        exits.append(main(["report", table, "--last", "1", "--max-psi", f"{limit}"]))
    assert exits == [0, 0, ALERT_EXIT]
    assert main(["report", table, "--since", "2000-01-01", "--max-failed-files", "0"]) == ALERT_EXIT

    result = report(table)
    assert [run.record.run_id for run in result.runs] == run_ids and result.reference.record.run_id == run_ids[0]
    for run, name in zip(result.runs, nights):
        record = run.record
        assert record.rows == run.rows_held == len(nights[name]) and record.files_scored == 1
        assert list(record.files_failed) == ([place.join("archive/broken.parquet")] if name == "n2.parquet" else [])
        assert record.positive_share == pytest.approx(spam_share[name])
        assert run.share_change == pytest.approx(spam_share[name] - spam_share["n1.parquet"])
        assert run.psi == pytest.approx(psi[name], abs=1e-6)
        assert (record.model_version, record.precision, record.positive) == (classifier.version, "fp32", "spam")

    out = place.join("report")
    assert main(["report", table, "--out", out, "--html"]) == 0
    written = json.loads(place.fs.cat_file(f"{place.path}/report/report.json"))
    assert list(written["runs"]) == run_ids and written["runs"][run_ids[2]]["psi"] == pytest.approx(psi["n3.csv"])
    for plot in ("nights.png", "scores.png"):
        image = matplotlib.image.imread(io.BytesIO(place.fs.cat_file(f"{place.path}/report/{plot}")), format="png")
        assert image.shape[0] > 200 and image.shape[1] > 400
    page = place.fs.cat_file(f"{place.path}/report/report.html").decode()
    assert page.count("data:image/png;base64,") == 2 and all(run_id in page for run_id in run_ids)
