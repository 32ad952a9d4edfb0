"""What scoring computes in: `auto` follows the hardware (GPUs; CPUs with bf16 units), a classifier
labels at bf16 only with a threshold calibration chose at bf16, and a trained classifier's labels
at its operating point hold at bf16. (Named to run after the multi-node tests: its in-process Ray
would slow their clusters.)"""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import commit_record

from spamray import TextClassifier
from spamray.calibrate import at_precision
from spamray.cli import main
from spamray.config import ScoreConfig
from spamray.operating_point import OperatingPoint
from spamray.precision import cpu_flags, resolve_precision
from spamray.score import score
from spamray.scores_table import ScoresTable

POINT = {"positive": "spam", "threshold": 0.9, "target_fpr": 0.005, "chosen_on": "heldout_tune", "messages": 2040,
         "false_positive_rate": 0.004, "heldout_false_positive_rates": {"fp32": 0.003, "bf16": 0.004},
         "thresholds": {"fp32": 0.9, "bf16": 0.91}}


def test_auto_is_bf16_on_gpus_and_on_cpus_with_bf16_units_and_fp32_elsewhere():
    assert resolve_precision("auto", on_gpu=True).precision == "bf16"
    for flags in ({"avx2", "avx512_bf16"}, {"amx_bf16", "amx_tile"}):
        choice = resolve_precision("auto", on_gpu=False, flags=frozenset(flags))
        assert choice.precision == "bf16" and (set(flags) & {"avx512_bf16", "amx_bf16"}).pop() in choice.reason
    plain = resolve_precision("auto", on_gpu=False, flags=frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert plain.precision == "fp32" and "no bf16 matrix units" in plain.reason
    assert resolve_precision("bf16", on_gpu=False, flags=frozenset()).precision == "bf16"  # asked for: honoured
    assert resolve_precision("fp32", on_gpu=True).precision == "fp32"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", on_gpu=True)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_a_classifier_labels_at_bf16_only_with_a_threshold_chosen_at_bf16():
    bf16_units = frozenset({"avx512_bf16"})
    assert resolve_precision("auto", False, bf16_units, POINT).precision == "bf16"
    assert resolve_precision("auto", False, bf16_units, None).precision == "bf16"  # no threshold: argmax labels
    fp32_only = {**POINT, "thresholds": {"fp32": 0.9}}  # calibrated with --precisions fp32
    choice = resolve_precision("auto", False, bf16_units, fp32_only)
    assert choice.precision == "fp32" and "no threshold was chosen at bf16" in choice.reason
    with pytest.raises(ValueError, match="--precision bf16: .*no threshold was chosen at bf16"):
        resolve_precision("bf16", False, bf16_units, fp32_only)
    assert resolve_precision("fp32", False, bf16_units, fp32_only).precision == "fp32"
    point = OperatingPoint(**fp32_only)
    assert point.threshold_at("fp32") == 0.9 and point.threshold_at("bf16") is None
    assert OperatingPoint(**POINT).threshold_at("bf16") == 0.91


@pytest.fixture(scope="module")
def calibrated(trained_enough, prepared_sms, tmp_path_factory) -> str:
    model = str(tmp_path_factory.mktemp("precision") / "model")
    assert main(["calibrate", trained_enough, prepared_sms, "--output", model, "--precisions", "bf16"]) == 0
    return model


def test_bf16_labels_at_the_operating_point_as_fp32_does_on_a_trained_classifier(calibrated, prepared_sms):
    fp32 = TextClassifier.load(calibrated)
    bf16 = at_precision(fp32, "bf16")
    heldout = pd.read_parquet(f"{prepared_sms}/heldout_test.parquet")["text"].tolist()[:300]
    texts = heldout + pd.read_parquet(f"{prepared_sms}/test.parquet")["text"].tolist()
    a, b = fp32.predict(texts), bf16.predict(texts)
    spam = np.array([p.probs["spam"] for p in a])
    assert 0.02 < (spam >= fp32.operating_point.threshold).mean() < 0.6  # a threshold that decides something
    assert 0 < max(abs(p.probs["spam"] - q.probs["spam"]) for p, q in zip(a, b))  # bf16 really ran
    assert np.mean([p.label == q.label for p, q in zip(a, b)]) >= 0.995


def test_a_scoring_run_records_the_precision_it_ran_in_and_why(ray_local, calibrated, sms_messages, tmp_path, caplog):
    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"text": sms_messages[:300]}), archive / "a.parquet")
    point = TextClassifier.load(calibrated).operating_point.to_dict()
    expected = resolve_precision("auto", on_gpu=False, operating_point=point)  # this machine's CPU decides
    fp32_labels = [p.label for p in TextClassifier.load(calibrated).predict(sms_messages[:300])]
    # auto, and bf16 asked for where auto chose another (an explicit choice is honoured on any CPU)
    for asked in ["auto"] + (["bf16"] if expected.precision != "bf16" else []):
        out = str(tmp_path / asked)
        summary = score(ScoreConfig(model=calibrated, input=str(archive), output=out, precision=asked))
        record = commit_record(out, summary.table_version)
        ran = expected.precision if asked == "auto" else "bf16"
        assert summary.precision == record["precision"] == ran
        assert record["precision_reason"] == (expected.reason if asked == "auto" else "as asked (--precision)")
        assert f"{ran} ({record['precision_reason']})" in caplog.text
        frame = ScoresTable(out).read().to_pandas().sort_values("source_row")
        assert np.mean(frame["label"].to_numpy() == np.array(fp32_labels)) >= 0.995


def test_a_precision_the_threshold_was_not_checked_at_is_refused_before_any_work(ray_local, calibrated, sms_messages,
                                                                                 tmp_path, capsys):
    classifier = TextClassifier.load(calibrated)
    classifier.operating_point.thresholds = {"fp32": classifier.operating_point.threshold}  # `--precisions fp32`
    old = str(tmp_path / "old")
    classifier.save(old)
    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"text": sms_messages[:10]}), archive / "a.parquet")
    out = tmp_path / "scores"
    assert main(["score", "--model", old, "--input", str(archive), "--output", str(out), "--precision", "bf16"]) == 1
    assert "no threshold was chosen at bf16" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="no threshold was chosen at bf16: `spamray calibrate --precisions bf16` chooses one"):
        at_precision(TextClassifier.load(old), "bf16").predict(["free entry"])


def test_a_threshold_given_on_the_command_line_is_applied_at_fp32_unless_bf16_is_asked_for():
    # A number from the user has no precision it was chosen at; calibration's thresholds do.
    bf16_units = frozenset({"avx512_bf16"})
    choice = resolve_precision("auto", False, bf16_units, None, threshold_given=True)
    assert choice.precision == "fp32" and "--threshold" in choice.reason
    asked = resolve_precision("bf16", False, bf16_units, None, threshold_given=True)
    assert asked.precision == "bf16" and "--threshold" in asked.reason and "bf16 probabilities" in asked.reason


def test_a_scoring_run_with_a_threshold_says_what_it_applies_it_to(ray_local, model_url, sms_messages, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr("spamray.precision.cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))  # a bf16 CPU
    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"text": sms_messages[:20]}), archive / "a.parquet")
    runs = {}
    for name, threshold in [("plain", None), ("threshold", 0.6)]:
        out = str(tmp_path / name)
        summary = score(ScoreConfig(model=model_url, input=str(archive), output=out, threshold=threshold))
        runs[name] = summary.precision, commit_record(out, summary.table_version)["precision_reason"]
    assert runs["plain"][0] == "bf16"  # auto on this (pretended) CPU, without a threshold
    assert runs["threshold"][0] == "fp32" and "--threshold" in runs["threshold"][1]


USABLE = {"onnx-fp32": None, "onnx-int8": None}
EVERY_PATH = {**POINT, "thresholds": {"fp32": 0.9, "bf16": 0.91, "onnx-fp32": 0.9, "onnx-int8": 0.92}}


@pytest.mark.parametrize("flags, exports, point, expected", [
    ({"avx2"}, USABLE, EVERY_PATH, "onnx-int8"),  # Zen 3: int8 on AVX2
    ({"avx2", "avx512_vnni", "avx512_bf16"}, USABLE, EVERY_PATH, "onnx-int8"),  # Zen 5: int8 before bf16
    ({"amx_bf16", "amx_int8"}, USABLE, EVERY_PATH, "onnx-int8"),  # AMX
    ({"avx2", "avx512_bf16"}, {**USABLE, "onnx-int8": "its onnx-int8 graph failed the gate"}, EVERY_PATH, "bf16"),
    ({"avx2"}, {**USABLE, "onnx-int8": "its onnx-int8 graph failed the gate"}, EVERY_PATH, "onnx-fp32"),
    ({"avx2"}, USABLE, {**POINT, "thresholds": {"fp32": 0.9, "onnx-fp32": 0.9}}, "onnx-fp32"),  # no int8 threshold
    ({"avx2"}, None, EVERY_PATH, "fp32"),  # a classifier without graphs is scored as before
    ({"avx512_bf16"}, None, EVERY_PATH, "bf16"),
    ({"avx2"}, USABLE, None, "onnx-int8"),  # no operating point: argmax labels, no threshold needed
])
def test_auto_takes_the_fastest_path_this_cpu_and_this_classifier_offer(flags, exports, point, expected):
    choice = resolve_precision("auto", False, frozenset(flags), point, exports=exports)
    assert choice.precision == expected
    assert choice.reason.startswith("auto: the fastest path that holds on this CPU (")
    passed_over = choice.reason.split("; not ")[1:]  # each faster path, with why it was not taken
    assert [why.partition(":")[0] for why in passed_over] == \
        list(("onnx-int8", "bf16", "onnx-fp32", "fp32")[:("onnx-int8", "bf16", "onnx-fp32", "fp32").index(expected)])


def test_an_explicit_onnx_path_is_refused_without_a_gated_graph_and_a_threshold():
    with pytest.raises(ValueError, match="--precision onnx-int8: it carries no ONNX graphs; run `spamray export"):
        resolve_precision("onnx-int8", False, frozenset({"avx2"}), EVERY_PATH)
    with pytest.raises(ValueError, match="--precision onnx-int8: its onnx-int8 graph failed"):
        resolve_precision("onnx-int8", False, frozenset(), EVERY_PATH,
                          exports={**USABLE, "onnx-int8": "its onnx-int8 graph failed the gate"})
    with pytest.raises(ValueError, match="no threshold was chosen at onnx-int8"):
        resolve_precision("onnx-int8", False, frozenset(), {**POINT, "thresholds": {"fp32": 0.9}}, exports=USABLE)
    assert resolve_precision("fp32", False, frozenset(), EVERY_PATH, exports=USABLE).precision == "fp32"
    assert resolve_precision("auto", True, None, EVERY_PATH, exports=USABLE).precision == "bf16"  # a GPU: torch bf16
