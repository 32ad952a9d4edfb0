"""Shadow scoring: a candidate classifier scored beside the model in use, in one pass, into a
table of its own; the table in use untouched, the flips those of `predict` with both models."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import spamray
from spamray import TextClassifier
from spamray.cli import main
from spamray.config import ScoreConfig
from spamray.report import report
from spamray.score import score
from test_scores_table import score_command, spamray_score, table_files, write_parquet


def saved_classifier(folder, labels, max_length=64, positive=None) -> str:
    torch.manual_seed(0)
    classifier = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), labels, max_length=max_length)
    if positive is not None:
        from spamray.calibration import Calibration

        classifier.set_calibration(Calibration(positive=positive))
    classifier.save(str(folder))
    return str(folder)


@pytest.mark.parametrize("candidate, refused", [
    (dict(labels=["ham", "spam"]), "labels"),
    (dict(labels=["not spam", "spam"], max_length=32), "token length"),
    (dict(labels=["not spam", "spam"], positive="not spam"), "positive class"),
])
def test_a_candidate_unlike_the_model_in_use_is_refused_before_any_work(tmp_path, candidate, refused):
    in_use = saved_classifier(tmp_path / "in-use", ["not spam", "spam"])
    other = saved_classifier(tmp_path / "candidate", **candidate)
    with pytest.raises(ValueError, match=refused):  # before a Ray start: the fast tier forbids one
        score(ScoreConfig(model=in_use, shadow=other, input=str(tmp_path), output=str(tmp_path / "shadow")))
    with pytest.raises(ValueError, match="--threshold"):
        ScoreConfig(model=in_use, shadow=other, input="i", output="o", threshold=0.5)


def flips_by_predict(in_use: str, candidate: str, texts: list[str]) -> tuple[int, int, int]:
    """(agreements, flips to spam, flips away from spam), each model at its own operating point."""
    a = [p.label for p in TextClassifier.load(in_use).predict(texts)]
    b = [p.label for p in TextClassifier.load(candidate).predict(texts)]
    return (sum(x == y for x, y in zip(a, b)), sum(x != "spam" and y == "spam" for x, y in zip(a, b)),
            sum(x == "spam" and y != "spam" for x, y in zip(a, b)))


@pytest.fixture(scope="module")
def candidate(trained_enough, prepared_sms, tmp_path_factory) -> str:
    """The model in use (`trained_enough`, argmax labels) calibrated for a 0.5% false-positive
    rate: the same scores, another threshold, so some rows flip away from spam."""
    folder = str(tmp_path_factory.mktemp("candidate") / "model")
    assert main(["calibrate", trained_enough, prepared_sms, "--output", folder, "--precisions", "fp32"]) == 0
    return folder


def test_a_shadow_run_leaves_the_table_in_use_alone_and_flips_as_predict_does(
        ray_local, place, trained_enough, candidate, sms_messages):
    texts = sms_messages[:300]
    write_parquet(place, "archive/day-1.parquet", texts)
    in_use_table, shadow_table = place.join("scores"), place.join("shadow")
    score(ScoreConfig(model=trained_enough, input=place.join("archive"), output=in_use_table, incremental=True,
                      precision="fp32"))
    files, version = table_files(in_use_table), report(in_use_table).runs[-1].record.version

    summary = score(ScoreConfig(model=trained_enough, shadow=candidate, input=place.join("archive"), output=shadow_table,
                                incremental=True, precision="fp32"))
    assert summary.files_scored == 1 and summary.rows_written == len(texts)
    assert table_files(in_use_table) == files and report(in_use_table).runs[-1].record.version == version

    agree, to_spam, from_spam = flips_by_predict(trained_enough, candidate, texts)
    assert from_spam > 0  # the candidate's threshold is stricter: the comparison has something to show
    run = report(shadow_table).runs[-1]
    compared = run.comparison
    assert (compared.rows, compared.agree, compared.to_positive, compared.to_negative) == (len(texts), agree, to_spam,
                                                                                            from_spam)
    assert run.record.in_use_version == TextClassifier.load(trained_enough).version
    assert run.record.model_version == TextClassifier.load(candidate).version
    # incremental, as any table: the next night scores nothing new into the shadow table
    assert score(ScoreConfig(model=trained_enough, shadow=candidate, input=place.join("archive"), output=shadow_table,
                             incremental=True, precision="fp32")).files_scored == 0


def test_a_killed_shadow_run_commits_nothing_to_either_table(ray_local, place, trained_enough, candidate, sms_messages):
    write_parquet(place, "archive/day-0.parquet", sms_messages[:40])
    in_use_table, shadow_table = place.join("scores"), place.join("shadow")
    score(ScoreConfig(model=trained_enough, input=place.join("archive"), output=in_use_table, incremental=True))
    in_use_files = table_files(in_use_table)
    write_parquet(place, "archive/day-1.parquet", sms_messages[600:1200])  # 16-row batches: seconds of writing
    args = score_command(trained_enough, place.join("archive"), shadow_table, "--shadow", candidate)
    run = spamray_score(args)
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None and not table_files(shadow_table):
        time.sleep(0.1)
    assert table_files(shadow_table), "the shadow run never started writing"
    os.killpg(run.pid, signal.SIGKILL)
    assert run.wait(timeout=300) == -signal.SIGKILL
    shadow_log = place.fs.glob(f"{place.path}/shadow/_delta_log/*.json")
    assert len(shadow_log) <= 1  # at most the table's creation: no run committed into it
    assert table_files(in_use_table) == in_use_files and len(report(in_use_table).runs) == 1
    assert main([*args, "--retention-hours", "0"]) == 0  # the rerun, on the suite's Ray, commits the whole night
    assert report(shadow_table).runs[-1].record.rows == 40 + 600
