"""A spam filter's operating point and calibration, end to end: prepared held-out ham, the
calibrate verb, the saved classifier, evaluate's figures and curves, and scoring with it.
(Named to run after the multi-node tests: its in-process Ray would slow their clusters.)"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import commit_record

import spamray
from spamray import TextClassifier
from spamray.cli import main
from spamray.config import ScoreConfig
from spamray.operating_point import OperatingPoint
from spamray.score import score
from spamray.scores_table import ScoresTable


def test_calibrate_then_evaluate_a_spam_filter(trained_enough, prepared_sms, tmp_path, capsys):
    before = TextClassifier.load(trained_enough)
    assert before.temperature == 1.0 and before.operating_point is None  # as saved before calibration
    out = str(tmp_path / "calibrated")
    assert main(["calibrate", trained_enough, prepared_sms, "--target-fpr", "0.01", "--output", out]) == 0
    calibrated = TextClassifier.load(out)
    point = calibrated.operating_point
    assert point.positive == "spam" and point.target_fpr == 0.01 and point.messages == 2040
    assert point.false_positive_rate <= 0.01 and calibrated.temperature != 1.0
    assert calibrated.version != before.version  # other probabilities and labels: another model version
    # The validation log loss went down (the fit's own objective), as recorded.
    fit = calibrated.metrics["calibration"]["validation"]
    assert fit["log_loss_after"] < fit["log_loss_before"]

    # predict labels with the threshold, probabilities calibrated
    texts = ["WINNER!! claim your free prize now, call 09061701461", "ok see you at 5", "Free entry to win a cash prize"]
    logits = before.logits_token_ids(before.encode(texts))
    for text, prediction, row in zip(texts, calibrated.predict(texts), logits):
        probs = np.exp(row / calibrated.temperature) / np.exp(row / calibrated.temperature).sum()
        assert prediction.probs["spam"] == pytest.approx(probs[1], abs=1e-6)
        assert prediction.label == ("spam" if prediction.probs["spam"] >= point.threshold else "not spam")

    capsys.readouterr()
    curves = tmp_path / "curves"
    assert main(["evaluate", out, prepared_sms, "--output", str(curves)]) == 0
    printed = capsys.readouterr().out
    assert "ROC AUC" in printed and "heldout_test: false-positive rate" in printed and "calibration (temperature" in printed
    assert "probabilities: calibrated for the validation split's mix" in printed
    report = json.loads((curves / "evaluation.json").read_text())
    # The two accuracies, named apart: the book's (most probable label) and the operating point's.
    assert report["accuracy_at_threshold"] < report["argmax_accuracy"]  # a threshold for 1% FPR flags less spam
    assert f"accuracy {report['argmax_accuracy']:.2%} by the most probable label (argmax_accuracy), " \
           f"{report['accuracy_at_threshold']:.2%} at the operating point (accuracy_at_threshold)" in printed
    binary = report["binary"]
    assert binary["heldout_test"]["messages"] == 2040 and 0 <= binary["heldout_test"]["false_positive_rate"] <= 0.05
    assert 0.5 < binary["roc_auc"] <= 1 and set(binary["recall_at_false_positive_rate"]) == {"0.001", "0.005", "0.01"}
    for plot in ("roc.png", "precision_recall.png"):
        assert (curves / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scoring_labels_by_the_operating_point_or_a_given_threshold(ray_local, trained_enough, prepared_sms, tmp_path,
                                                                    sms_messages):
    model = str(tmp_path / "model")
    assert main(["calibrate", trained_enough, prepared_sms, "--output", model]) == 0
    classifier = TextClassifier.load(model)
    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"text": sms_messages[:400]}), archive / "a.parquet")
    out = str(tmp_path / "scores")
    summary = score(ScoreConfig(model=model, input=str(archive), output=out, batch_size=64))
    frame = ScoresTable(out).read().to_pandas()
    threshold = classifier.operating_point.threshold_at(summary.precision)  # auto: bf16 on a CPU with bf16 units
    assert summary.threshold == threshold
    assert ((frame["p_spam"] >= threshold) == (frame["label"] == "spam")).all()
    assert set(frame["model_version"]) == {classifier.version}

    # A threshold given for one run: its own labels, recorded, and another scoring of the file.
    again = score(ScoreConfig(model=model, input=str(archive), output=out, batch_size=64, threshold=0.5, incremental=True))
    latest = ScoresTable(out).read().to_pandas()
    assert again.files_scored == 1 and set(latest["model_version"]) == {f"{classifier.version}-t0.5"}
    assert ((latest["p_spam"] >= 0.5) == (latest["label"] == "spam")).all()
    assert commit_record(out, again.table_version)["threshold"] == 0.5


def test_an_uncalibrated_classifier_labels_by_argmax_until_it_has_an_operating_point_and_multiclass_keeps_argmax(
        tmp_path):
    torch.manual_seed(1)
    binary = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["not spam", "spam"])
    binary.save(str(tmp_path / "old"))
    record = json.loads((tmp_path / "old" / "spamray.json").read_text())
    old = TextClassifier.load(str(tmp_path / "old"))
    assert old.version == record["weights"]["sha256"][:16]  # tables scored with it stay scored
    probs = np.array([[0.6, 0.4], [0.3, 0.7]], dtype=np.float32)
    assert old.label_ids(probs).tolist() == [0, 1]
    old.set_calibration(replace(old.calibration, operating_point=OperatingPoint("spam", 0.8, 0.005, "heldout_tune", 100,
                                                                                0.0, {}, {"fp32": 0.8})))
    assert old.label_ids(probs).tolist() == [0, 0] and old.label_ids(probs, threshold=0.35).tolist() == [1, 1]
    three = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["a", "b", "c"])
    assert three.label_ids(np.array([[0.2, 0.5, 0.3]])).tolist() == [1]
    with pytest.raises(ValueError, match="two labels"):
        three.label_ids(np.array([[0.2, 0.5, 0.3]]), threshold=0.4)


# -- the positive class, explicit -------------------------------------------------------------------
@pytest.fixture
def spam_and_valid_csv(tmp_path, sms_messages):
    """Labels 'spam' and 'valid': the legitimate class sorts second, and is the larger one."""
    import csv

    text = (Path(spamray.__file__).parent / "data" / "SMSSpamCollection").read_text(encoding="utf-8")
    rows = [row for row in csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)][:1500]
    path = tmp_path / "mail.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "text"])
        writer.writerows([("valid" if label == "ham" else "spam", message) for label, message in rows])
    return str(path)


@pytest.mark.parametrize("order", [None, "spam,valid", "valid,spam"])
def test_the_positive_class_is_the_one_named_whatever_the_label_order(spam_and_valid_csv, tmp_path, order):
    from spamray.calibrate import calibrate
    from spamray.config import EvaluateConfig, PrepareConfig
    from spamray.evaluate import evaluate
    from spamray.prepare import prepare, read_positive_label, read_prepared_labels

    data = str(tmp_path / "data")
    prepare(PrepareConfig(output=data, input=spam_and_valid_csv, labels=order))
    labels = read_prepared_labels(data)
    assert read_positive_label(data) == "spam" and labels == (order.split(",") if order else ["spam", "valid"])
    torch.manual_seed(0)
    classifier = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), labels, max_length=64).eval()
    report = calibrate(classifier, data, target_fpr=0.05)
    assert classifier.operating_point.positive == "spam" and classifier.positive == "spam"
    assert report["heldout_test"]["messages"] > 100  # the held-out 'valid' messages, whatever their id
    model = str(tmp_path / "model")
    classifier.save(model)
    assert TextClassifier.load(model).positive == "spam"
    binary = evaluate(EvaluateConfig(model=model, data=data))["binary"]
    assert binary["positive"] == "spam" and binary["heldout_test"]["messages"] == report["heldout_test"]["messages"]
    flagged = TextClassifier.load(model).predict(["hi"] * 3)
    assert {p.label for p in flagged} <= set(labels)


def test_an_operating_point_that_cannot_be_chosen_fails_before_training_and_none_turns_it_off(
        spam_and_valid_csv, tmp_path, capsys):
    from spamray.config import PrepareConfig, TrainConfig
    from spamray.prepare import prepare
    from spamray.train import train

    data = str(tmp_path / "data")
    prepare(PrepareConfig(output=data, input=spam_and_valid_csv, positive_label="valid"))  # the larger class
    with pytest.raises(ValueError, match="heldout_tune holds no messages other than the positive class 'valid'"):
        train(TrainConfig(data=data, output=str(tmp_path / "model"), weights="random", preset="gpt2-tiny",
                          storage_path=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()  # refused before any Ray Train run
    torch.manual_seed(0)
    TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["spam", "valid"], max_length=64).save(
        str(tmp_path / "model"))
    assert main(["calibrate", str(tmp_path / "model"), data, "--target-fpr", "none"]) == 0
    assert TextClassifier.load(str(tmp_path / "model")).operating_point is None


# -- the threshold at the replicas' precision --------------------------------------------------------
def test_the_false_positive_rate_is_measured_at_each_precision_and_every_path_labels_alike(
        trained_enough, prepared_sms, tmp_path, capsys, caplog):
    """bf16 replicas keep the final LayerNorm and the head in fp32; calibrate measures the held-out
    rate at fp32 and at bf16 (asked for by name), and evaluate and a scoring replica at that
    precision flag exactly the messages calibrate counted."""
    import pandas as pd

    from spamray.calibrate import at_precision
    from spamray.replica import Scorer, tokenize_batch

    model = str(tmp_path / "model")
    assert main(["calibrate", trained_enough, prepared_sms, "--target-fpr", "0.01", "--output", model,
                 "--precisions", "bf16"]) == 0  # named: bf16 on any CPU (auto leaves it out where it is emulated)
    logged = caplog.text
    classifier = TextClassifier.load(model)
    point = classifier.operating_point
    rates = point.heldout_false_positive_rates
    assert set(rates) == {"fp32", "bf16"} and f"{rates['fp32']:.2%} at fp32, {rates['bf16']:.2%} at bf16" in logged
    record = classifier.metrics["calibration"]["heldout_test"]
    assert record["false_positive_rate_by_precision"] == rates and record["messages"] == 2040

    bf16 = at_precision(classifier, "bf16")
    assert classifier.precision == "fp32" and bf16 is not classifier  # a copy: the fp32 weights stay whole
    assert bf16.gpt.trf_blocks[0].att.qkv.weight.dtype == torch.bfloat16
    assert bf16.gpt.final_norm.weight.dtype == bf16.gpt.out_head.weight.dtype == torch.float32
    heldout = pd.read_parquet(f"{prepared_sms}/heldout_test.parquet")
    legitimate = heldout.loc[heldout["label_name"] != "spam", "text"].tolist()
    for precision, replica in (("fp32", classifier), ("bf16", bf16)):
        flagged = [p.label == "spam" for p in replica.predict(legitimate)]
        assert np.mean(flagged) == rates[precision]
        # evaluate at that precision reports the same rate, naming it
        assert main(["evaluate", model, prepared_sms, "--precision", precision]) == 0
        assert f"heldout_test: false-positive rate {rates[precision]:.2%} at {precision}" in capsys.readouterr().out
        # a scoring replica at that precision labels these messages as predict() does
        scorer = Scorer(model, threads=1, model_name="m", precision=precision)
        batch = tokenize_batch(pa.table({"text": legitimate[:500], "status": pa.nulls(500, pa.string())}),
                               max_length=classifier.max_length, keep_text=False)
        assert (scorer(batch)["label"].to_numpy() == "spam").tolist() == flagged[:500]


@pytest.mark.parametrize("flags", [{"avx2"}, {"avx2", "avx512_bf16"}])
def test_calibrate_chooses_a_bf16_threshold_by_default_only_where_the_cpu_runs_bf16(trained_enough, prepared_sms,
                                                                                     tmp_path, monkeypatch, flags):
    """bf16 emulated on a CPU without bf16 units runs at about a sixth of fp32's speed: calibrating
    at it there costs more than it is worth, unless asked for."""
    monkeypatch.setattr("spamray.calibrate.cpu_flags", lambda: frozenset(flags))
    model = str(tmp_path / "model")
    assert main(["calibrate", trained_enough, prepared_sms, "--output", model]) == 0
    chosen = set(TextClassifier.load(model).operating_point.thresholds)
    assert chosen == ({"fp32", "bf16"} if "avx512_bf16" in flags else {"fp32"})


def test_a_prior_moves_the_probabilities_but_not_the_labels_at_the_operating_point(trained_enough, prepared_sms,
                                                                                   tmp_path, capsys):
    import pandas as pd

    plain, shifted = str(tmp_path / "plain"), str(tmp_path / "shifted")
    assert main(["calibrate", trained_enough, prepared_sms, "--output", plain]) == 0
    assert main(["calibrate", trained_enough, prepared_sms, "--prior", "0.13", "--output", shifted]) == 0
    a, b = TextClassifier.load(plain), TextClassifier.load(shifted)
    validation = pd.read_parquet(f"{prepared_sms}/validation.parquet")
    assert a.calibrated_share == b.calibrated_share == pytest.approx((validation["label_name"] == "spam").mean())
    assert (a.prior, b.prior) == (None, 0.13)
    texts = pd.read_parquet(f"{prepared_sms}/heldout_test.parquet")["text"].tolist()[:800] + \
        pd.read_parquet(f"{prepared_sms}/test.parquet")["text"].tolist()
    pa_, pb = a.predict(texts), b.predict(texts)
    assert [p.label for p in pa_] == [p.label for p in pb]  # the operating point flags the same messages
    assert sum(p.label == "spam" for p in pa_) > 50
    assert all(q.probs["spam"] <= p.probs["spam"] + 1e-6 for p, q in zip(pa_, pb))  # less spam in real traffic
    assert b.operating_point.threshold < a.operating_point.threshold
    assert b.operating_point.heldout_false_positive_rates == a.operating_point.heldout_false_positive_rates
    capsys.readouterr()
    assert main(["evaluate", shifted, prepared_sms]) == 0
    assert f"shifted to --prior 13.0% 'spam'" in capsys.readouterr().out
    assert main(["calibrate", trained_enough, prepared_sms, "--prior", "1.3", "--output", plain]) == 1
    assert "--prior 1.3 must be a share strictly between 0 and 1" in capsys.readouterr().err
