"""ONNX Runtime as a scoring path: the export's graphs, its parity gate, their thresholds, `auto`'s
choice, and their checks on load. (Named to run after the multi-node tests: its in-process Ray
would slow their clusters.)"""

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import commit_record

from spamray import TextClassifier
from spamray.calibrate import at_precision
from spamray.cli import main
from spamray.config import ScoreConfig
from spamray.onnx_graphs import GRAPH_FILES, export_problems
from spamray.saved import SavedClassifierError, read_metadata
from spamray.score import score
from spamray.scores_table import ScoresTable


@pytest.fixture
def exported(exported_classifier) -> str:
    return exported_classifier


def judged_messages(prepared_sms: str) -> list[str]:
    """A few hundred messages: held-out legitimate ones (where the threshold bites) and the test split."""
    heldout = pd.read_parquet(f"{prepared_sms}/heldout_test.parquet")["text"].tolist()[:300]
    return heldout + pd.read_parquet(f"{prepared_sms}/test.parquet")["text"].tolist()


def test_the_export_keeps_gated_graphs_with_their_digests_versions_and_thresholds(exported, prepared_sms, capsys):
    metadata = read_metadata(exported)
    record = metadata["onnx"]
    assert record["weights_sha256"] == metadata["weights"]["sha256"]
    assert set(record["versions"]) == {"torch", "onnx", "onnxruntime"} and record["opset"] >= 17
    for path, graph in record["graphs"].items():
        assert graph["file"] == GRAPH_FILES[path] and len(graph["sha256"]) == 64 and graph["gate"]["passed"]
    assert record["graphs"]["onnx-fp32"]["gate"]["max_abs_logit_diff"] <= 1e-4
    assert record["graphs"]["onnx-int8"]["gate"]["label_agreement"] >= 0.995
    assert export_problems(metadata) == {"onnx-fp32": None, "onnx-int8": None}
    point = TextClassifier.load(exported).operating_point
    assert {"fp32", "onnx-fp32", "onnx-int8"} <= set(point.thresholds) <= set(point.heldout_false_positive_rates) | {"bf16"}


def test_onnx_paths_label_as_fp32_does_at_the_operating_point_on_any_batch_and_length(exported, prepared_sms):
    fp32 = TextClassifier.load(exported)
    texts = judged_messages(prepared_sms)
    reference = fp32.predict(texts)
    spam = np.array([p.probs["spam"] for p in reference])
    assert 0.02 < (spam >= fp32.operating_point.threshold).mean() < 0.6  # a threshold that decides something
    for path in ("onnx-fp32", "onnx-int8"):
        replica = at_precision(fp32, path)
        assert replica.onnx is not None and fp32.onnx is None  # the graph runs; the fp32 classifier stays torch
        predictions = replica.predict(texts)
        agreement = np.mean([p.label == q.label for p, q in zip(reference, predictions)])
        assert agreement >= 0.995, (path, agreement)
        gap = max(abs(p.probs["spam"] - q.probs["spam"]) for p, q in zip(reference, predictions))
        assert (gap < 1e-4) if path == "onnx-fp32" else (0 < gap < 0.05)  # int8 really ran, and stayed close
        # any batch size and length: one message at a time gives what its bucket of many gave; at
        # int8 nearly (activations are quantized with one scale per batch, so a batch's other rows
        # move a message's probability a little)
        one_by_one = [replica.predict([text])[0].probs["spam"] for text in texts[:20]]
        tolerance = 1e-5 if path == "onnx-fp32" else 5e-3
        assert np.allclose(one_by_one, [p.probs["spam"] for p in predictions[:20]], atol=tolerance)


def test_a_broken_export_fails_the_parity_gate_and_its_path_is_refused(trained_enough, prepared_sms, tmp_path,
                                                                        monkeypatch, capsys):
    import spamray.export

    def broken_graphs(classifier):  # the graphs of other weights: what a wrong export would compute
        broken = TextClassifier.load(classifier.source)
        with torch.no_grad():
            for parameter in broken.gpt.trf_blocks[-1].parameters():
                parameter.add_(torch.randn_like(parameter) * 0.5)
        return real_export(broken)

    real_export = spamray.export.export_graphs
    monkeypatch.setattr(spamray.export, "export_graphs", broken_graphs)
    model = str(tmp_path / "model")
    assert main(["calibrate", trained_enough, prepared_sms, "--output", model]) == 0
    assert main(["export", model, prepared_sms]) == 1
    captured = capsys.readouterr()
    assert "onnx-fp32, onnx-int8 failed the parity gate" in captured.err
    assert "onnx-fp32 REFUSED (max |logit - torch fp32|" in captured.out
    metadata = read_metadata(model)
    gates = {path: graph["gate"] for path, graph in metadata["onnx"]["graphs"].items()}
    assert gates["onnx-fp32"]["max_abs_logit_diff"] > 1e-4 and not gates["onnx-fp32"]["passed"]
    assert gates["onnx-int8"]["label_agreement"] < 0.995 and not gates["onnx-int8"]["passed"]
    assert not any((tmp_path / "model" / file).exists() for file in GRAPH_FILES.values())  # nothing kept
    with pytest.raises(SavedClassifierError, match="failed the export's parity gate .*labels equal to fp32's on"):
        at_precision(TextClassifier.load(model), "onnx-int8")
    assert main(["evaluate", model, prepared_sms, "--precision", "onnx-int8"]) == 1
    assert "failed the export's parity gate" in capsys.readouterr().err


def test_onnx_threads_spin_in_process_and_sleep_in_a_replica(exported):
    # A replica shares its cores with Ray and its neighbours; a process of its own does not.
    from spamray.replica import Scorer

    def spinning(classifier) -> str:
        return classifier.onnx.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    assert spinning(TextClassifier.load(exported).set_precision("onnx-int8", threads=2)) == "1"
    assert spinning(Scorer(exported, threads=2, model_name="m", precision="onnx-int8").classifier) == "0"


def test_a_tampered_or_stale_graph_is_refused_on_load(exported, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(exported, tampered)
    graph = tampered / GRAPH_FILES["onnx-int8"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(SavedClassifierError, match="model.int8.onnx does not match the sha256 .*spamray export"):
        at_precision(TextClassifier.load(str(tampered)), "onnx-int8")
    at_precision(TextClassifier.load(str(tampered)), "onnx-fp32")  # the other graph is whole

    changed = TextClassifier.load(exported)  # trained further: the graphs are of the weights before
    with torch.no_grad():
        changed.gpt.out_head.bias.add_(0.1)
    changed.save(str(tmp_path / "changed"))
    assert (tmp_path / "changed" / GRAPH_FILES["onnx-int8"]).exists()  # carried along, and known stale
    stale = TextClassifier.load(str(tmp_path / "changed"))
    assert "exported from other weights" in export_problems(stale.saved_metadata)["onnx-int8"]
    with pytest.raises(SavedClassifierError, match="exported from other weights .*spamray export"):
        at_precision(stale, "onnx-int8")


def test_a_scoring_run_takes_the_fastest_path_and_its_commit_names_it(ray_local, exported, prepared_sms, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr("spamray.precision.cpu_flags", lambda: frozenset({"avx2"}))  # int8 first on any x86 CPU
    texts = judged_messages(prepared_sms)[:200]
    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"text": texts}), archive / "a.parquet")
    out = str(tmp_path / "scores")
    summary = score(ScoreConfig(model=exported, input=str(archive), output=out))
    record = commit_record(out, summary.table_version)
    assert summary.precision == record["precision"] == "onnx-int8"
    assert record["precision_reason"].startswith("auto: the fastest path that holds on this CPU")
    classifier = at_precision(TextClassifier.load(exported), "onnx-int8")
    assert record["threshold"] == classifier.operating_point.thresholds["onnx-int8"]
    frame = ScoresTable(out).read().to_pandas().sort_values("source_row")
    assert frame["label"].tolist() == [p.label for p in classifier.predict(texts)]


class ThreadProbe:
    """A scoring replica that reports the threads it computes on, from the thread Ray Data calls
    it on (not the one that built it)."""

    def __init__(self, model_url: str, threads: int, precision: str):
        from spamray.replica import Scorer

        self.scorer = Scorer(model_url, threads=threads, model_name="m", precision=precision)

    def __call__(self, batch: dict) -> dict:
        onnx = self.scorer.classifier.onnx
        options = onnx.session.get_session_options() if onnx else None
        return {"torch_threads": np.full(len(batch["id"]), torch.get_num_threads()),
                "onnx_threads": np.full(len(batch["id"]), options.intra_op_num_threads if onnx else 0),
                "onnx_spinning": np.full(len(batch["id"]), options.get_session_config_entry(
                    "session.intra_op.allow_spinning") if onnx else "")}


def test_a_replica_computes_on_as_many_threads_as_it_reserved(ray_local, exported):
    import ray
    import ray.data

    from spamray.replica import replica_cpu_reservation, replica_threads

    reserved = replica_cpu_reservation(1, 2, ray.cluster_resources()["CPU"])  # (scoring's default: 2 per replica)
    threads = replica_threads(reserved)
    assert threads == max(1, int(reserved)) <= 2
    for precision in ("fp32", "onnx-int8"):
        rows = (ray.data.range(4)
                .map_batches(ThreadProbe, batch_size=2, num_cpus=reserved, compute=ray.data.ActorPoolStrategy(size=1),
                             fn_constructor_kwargs={"model_url": exported, "threads": threads, "precision": precision})
                .take_all())
        assert {row["torch_threads"] for row in rows} == {threads}
        assert {row["onnx_threads"] for row in rows} == ({threads} if precision == "onnx-int8" else {0})
        # (its threads sleep between parallel regions: the node's other work needs the cores)
        assert {row["onnx_spinning"] for row in rows} == ({"0"} if precision == "onnx-int8" else {""})
