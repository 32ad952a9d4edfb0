"""A spam filter's operating point and calibration, end to end: prepared held-out ham, the
calibrate verb, the saved classifier, evaluate's figures and curves, and scoring with it.
(Named to run after the multi-node tests: its in-process Ray would slow their clusters.)"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import spamray
from spamray import TextClassifier
from spamray.cli import main
from spamray.config import ScoreConfig
from spamray.operating_point import OperatingPoint, softmax
from spamray.score import score
from spamray.scores_table import ScoresTable


@pytest.fixture(scope="module")
def trained_enough(tmp_path_factory, prepared_sms):
    """A tiny classifier fitted in-process on the training split for a few hundred steps: far
    from the book's, but its scores separate spam from ham, and over-confidently."""
    import pandas as pd

    torch.manual_seed(0)
    classifier = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["not spam", "spam"],
                                          trainable="all", max_length=64)
    frame = pd.read_parquet(f"{prepared_sms}/train.parquet")
    ids = classifier.encode(frame["text"].tolist())
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(300):
        rows = rng.choice(len(ids), 16, replace=False)
        tokens, lengths = spamray.get_tokenizer().pad([ids[i] for i in rows])
        loss = torch.nn.functional.cross_entropy(classifier(torch.from_numpy(tokens), torch.from_numpy(lengths)),
                                                 torch.as_tensor(frame["label"].to_numpy()[rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("calibrated") / "model"
    classifier.eval().save(str(folder))
    return str(folder)


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
        probs = softmax(row[None, :], calibrated.temperature)[0]
        assert prediction.probs["spam"] == pytest.approx(probs[1], abs=1e-6)
        assert prediction.label == ("spam" if probs[1] >= point.threshold else "not spam")

    capsys.readouterr()
    curves = tmp_path / "curves"
    assert main(["evaluate", out, prepared_sms, "--output", str(curves)]) == 0
    printed = capsys.readouterr().out
    assert "ROC AUC" in printed and "heldout_test: false-positive rate" in printed and "calibration (temperature" in printed
    report = json.loads((curves / "evaluation.json").read_text())
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
    assert summary.threshold == classifier.operating_point.threshold
    assert ((frame["p_spam"] >= classifier.operating_point.threshold) == (frame["label"] == "spam")).all()
    assert set(frame["model_version"]) == {classifier.version}

    # A threshold given for one run: its own labels, recorded, and another scoring of the file.
    again = score(ScoreConfig(model=model, input=str(archive), output=out, batch_size=64, threshold=0.5, incremental=True))
    latest = ScoresTable(out).read().to_pandas()
    assert again.files_scored == 1 and set(latest["model_version"]) == {f"{classifier.version}-t0.5"}
    assert ((latest["p_spam"] >= 0.5) == (latest["label"] == "spam")).all()
    assert summary_threshold_in_log(out, again.table_version) == 0.5


def summary_threshold_in_log(table_url: str, version: int) -> float:
    entry = Path(table_url) / "_delta_log" / f"{version:020d}.json"
    info = next(json.loads(line) for line in entry.read_text().splitlines() if '"commitInfo"' in line)
    record = info["commitInfo"]["spamray"]
    return (json.loads(record) if isinstance(record, str) else record)["threshold"]


def test_a_classifier_saved_before_calibration_labels_as_before_and_multiclass_keeps_argmax(tmp_path):
    torch.manual_seed(1)
    binary = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["not spam", "spam"])
    binary.save(str(tmp_path / "old"))
    record = json.loads((tmp_path / "old" / "spamray.json").read_text())
    for key in ("temperature", "operating_point"):  # what a spamray from before wrote
        record.pop(key)
    (tmp_path / "old" / "spamray.json").write_text(json.dumps(record))
    old = TextClassifier.load(str(tmp_path / "old"))
    assert old.version == record["weights"]["sha256"][:16]  # tables scored with it stay scored
    probs = np.array([[0.6, 0.4], [0.3, 0.7]], dtype=np.float32)
    assert old.label_ids(probs).tolist() == [0, 1]
    old.operating_point = OperatingPoint("spam", 0.8, 0.005, "heldout_tune", 100, 0.0)
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
