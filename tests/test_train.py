"""Fine-tuning on Ray Train: two workers, recovery from a checkpoint, pretrained weights by path."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

import spamray
import spamray.tokenizer
from conftest import SPAMRAY, spamray_process
from spamray import TextClassifier
from spamray.cli import main
from spamray.calibration import Calibration
from spamray.config import TrainConfig
from spamray.train import train
from spamray.train_steps import DataStalled, TokenizeAndPad, arriving_within


def tiny_config(tmp_path, prepared, **overrides):
    settings = dict(data=prepared, output=str(tmp_path / "model"), weights="random", preset="gpt2-tiny",
                    trainable="all", learning_rate=5e-4, epochs=1, eval_freq=10, num_workers=2,
                    cpus_per_worker=1, storage_path=str(tmp_path / "runs"))
    return TrainConfig(**{**settings, **overrides})


def test_two_workers_learn_and_stay_identical(ray_local, prepared_sms, tmp_path):
    metrics = train(tiny_config(tmp_path, prepared_sms))
    losses = metrics["history"]["train_losses"]
    assert len(losses) >= 5
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])  # the loss falls
    digests = metrics["training"]["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # DDP kept both replicas identical
    assert metrics["test_argmax_accuracy"] > 0.8
    saved = TextClassifier.load(str(tmp_path / "model"))
    assert saved.metrics["test_argmax_accuracy"] == metrics["test_argmax_accuracy"]
    for plot in ("loss.png", "accuracy.png"):
        assert (tmp_path / "model" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def latest_checkpoint_epoch(storage_path: Path) -> int:
    """The epoch of the latest checkpoint Ray Train has registered for the one run under
    `storage_path` (0 before the first)."""
    snapshots = list(storage_path.glob("*/checkpoint_manager_snapshot.json"))
    if not snapshots:
        return 0
    latest = json.loads(snapshots[0].read_text()).get("latest_checkpoint_result") or {}
    return latest.get("metrics", {}).get("epoch", 0)


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_local, prepared_sms, tmp_path):
    # One worker, 32 steps an epoch (1,045 // 32), in a `spamray train` process of its own: once
    # Ray Train has registered the first epoch's checkpoint, the worker's process is killed
    # (SIGKILL, as a crash or the out-of-memory killer would).
    args = ["train", "--data", prepared_sms, "--output", str(tmp_path / "model"), "--weights", "random",
            "--preset", "gpt2-tiny", "--trainable", "all", "--learning-rate", "5e-4", "--epochs", "2",
            "--eval-freq", "10", "--batch-size", "32", "--num-workers", "1", "--cpus-per-worker", "2",
            "--max-failures", "1", "--storage-path", str(tmp_path / "runs")]
    run = spamray_process(SPAMRAY, args)
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None and latest_checkpoint_epoch(tmp_path / "runs") < 1:
        time.sleep(0.1)
    workers = [p for p in psutil.Process(run.pid).children(recursive=True) if p.name().startswith("ray::RayTrainWor")]
    assert run.poll() is None and len(workers) == 1, "training ended, or has no worker, before the kill"
    workers[0].kill()
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    metrics = TextClassifier.load(str(tmp_path / "model")).metrics
    training = metrics["training"]
    assert training["resumed_from_epoch"] == 1  # restarted from epoch 1's checkpoint, not step 0
    assert training["global_step"] == 2 * 32 - 1  # no step counted twice
    assert training["examples_seen"] == 2 * 32 * 32

    # Started again with the same settings (saving elsewhere) after it finished: nothing is trained twice.
    cfg = tiny_config(tmp_path, prepared_sms, output=str(tmp_path / "model-again"), epochs=2, batch_size=32,
                      num_workers=1, cpus_per_worker=2)
    again = train(cfg)
    assert again["training"]["resumed_from_epoch"] == 2  # the finished run's final checkpoint, handed back
    assert again["training"]["global_step"] == 2 * 32 - 1 and again["training"]["examples_seen"] == 2 * 32 * 32
    assert again["test_argmax_accuracy"] == metrics["test_argmax_accuracy"]


def test_pretrained_weights_by_path_through_the_cli(ray_local, prepared_sms, small_hf_checkpoint, tmp_path, caplog):
    folder, reference = small_hf_checkpoint
    code = main(["train", "--data", prepared_sms, "--output", str(tmp_path / "model"), "--weights", str(folder),
                 "--epochs", "1", "--eval-freq", "20", "--storage-path", str(tmp_path / "runs"), "--precision", "bf16"])
    assert code == 0
    assert "bf16: as asked (--precision)" in caplog.text  # bf16 autocast; the weights stay fp32:
    tensors = load_file(tmp_path / "model" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    # last_block (the book's policy) froze the embedding and first block: they are the checkpoint's.
    torch.testing.assert_close(tensors["gpt.tok_emb.weight"], reference.transformer.wte.weight, rtol=0, atol=0)
    torch.testing.assert_close(tensors["gpt.trf_blocks.0.att.qkv.weight"], reference.transformer.h[0].attn.c_attn.weight.t(), rtol=0, atol=0)
    assert not torch.equal(tensors["gpt.trf_blocks.1.ff.fc.weight"], reference.transformer.h[1].mlp.c_fc.weight.t())
    metadata = json.loads((tmp_path / "model" / "spamray.json").read_text())
    assert metadata["trainable"] == "last_block" and metadata["labels"] == ["not spam", "spam"]
    assert metadata["metrics"]["settings"]["precision"] == "bf16"

    # evaluate and classify the model just trained
    assert main(["evaluate", str(tmp_path / "model"), prepared_sms]) == 0
    assert main(["classify", str(tmp_path / "model"), "WINNER! claim your prize", "see you at 5"]) == 0


def test_bad_training_input(ray_local, prepared_sms, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "m"), "--weights", "random"]) == 1
    assert "has no labels.json (run `spamray prepare`)" in capsys.readouterr().err
    assert main(["train", "--data", prepared_sms, "--output", str(tmp_path / "m"), "--weights", "random",
                 "--preset", "gpt2-tiny", "--trainable", "some"]) == 1
    assert "unknown trainable policy 'some'" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), prepared_sms]) == 1
    assert "is not a spamray classifier" in capsys.readouterr().err


def test_a_stalled_data_pipeline_fails_the_attempt_instead_of_hanging():
    never = threading.Event()

    def stalls_after(n):
        yield from range(n)
        never.wait()  # as an iterator whose next block never comes

    batches = arriving_within(stalls_after(3), timeout_s=0.2, what="training")
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(DataStalled, match="no training batch arrived in 0.2 s.*--max-failures.*--data-timeout-s"):
        next(batches)
    never.set()


def test_only_waiting_for_data_counts_against_the_timeout_and_errors_come_through():
    def slow_steps():
        for batch in arriving_within(iter(range(4)), timeout_s=0.1, what="training"):
            time.sleep(0.2)  # a training step longer than the timeout: not a stall
            yield batch

    assert list(slow_steps()) == [0, 1, 2, 3]

    def breaks():
        yield 1
        raise ValueError("block 2 is corrupt")

    with pytest.raises(ValueError, match="block 2 is corrupt"):
        list(arriving_within(breaks(), timeout_s=5, what="training"))


def test_the_training_batches_come_without_deprecated_calls(ray_local, prepared_sms):
    # A plain function as collate_fn is deprecated in Ray 2.60 (pyproject makes the warning an
    # error); a NumpyBatchCollateFn is what Ray asks for. Labels come as a writable copy.
    import ray.data

    from spamray.prepare import split_url

    rows = ray.data.read_parquet(split_url(prepared_sms, "validation")).select_columns(["text", "label"])
    ids, lengths, labels = next(iter(rows.iter_torch_batches(batch_size=4, collate_fn=TokenizeAndPad(96, None))))
    assert ids.shape == (4, int(lengths.max())) and labels.dtype == torch.long and set(labels.tolist()) <= {0, 1}
    assert (ids[0, lengths[0]:] == spamray.tokenizer.PAD_ID).all()


def test_data_prepared_again_into_the_same_folder_is_a_new_run_not_the_earlier_result(ray_local, tmp_path):
    from spamray.config import PrepareConfig
    from spamray.prepare import prepare, read_prepared_labels

    data = str(tmp_path / "data")
    prepare(PrepareConfig(output=data))
    settings = dict(num_workers=1, cpus_per_worker=2, batch_size=32, eval_freq=100)
    first = train(tiny_config(tmp_path, data, output=str(tmp_path / "first"), target_fpr=None, **settings))
    prepare(PrepareConfig(output=data, labels="spam,ham", overwrite=True))  # the same folder, the other label order
    labels = read_prepared_labels(data)
    assert labels != TextClassifier.load(str(tmp_path / "first")).labels
    # No operating point: with 'spam' first it would be chosen for label id 1 (issue 18's positive label).
    second = train(tiny_config(tmp_path, data, output=str(tmp_path / "second"), target_fpr=None, **settings))
    assert second["settings"]["run_name"] != first["settings"]["run_name"]
    assert second["training"]["resumed_from_epoch"] == 0  # it trained, from the start
    assert second["training"]["global_step"] == first["training"]["global_step"] == 1045 // 32 - 1
    assert TextClassifier.load(str(tmp_path / "second")).labels == labels


def test_a_calibration_that_fails_after_training_loses_no_model(prepared_sms, tmp_path, monkeypatch, caplog):
    import spamray.train

    def broken_calibration(*args, **kwargs):
        raise OSError("the prepared folder's bucket is unreachable")

    monkeypatch.setattr(spamray.train, "calibrate", broken_calibration)
    torch.manual_seed(0)
    classifier = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["not spam", "spam"]).eval()
    classifier.set_calibration(Calibration("spam", temperature=3.0))  # as if calibration had got half way
    cfg = tiny_config(tmp_path, prepared_sms)
    with pytest.raises(OSError, match="unreachable"):
        spamray.train.calibrate_and_save(classifier, cfg, {"history": {}}, {"loss.png": b"png"})
    saved = TextClassifier.load(cfg.output)  # the trained weights are on disk, uncalibrated
    assert saved.temperature == 1.0 and saved.operating_point is None
    assert saved.metrics["calibration"] == {"failed": "OSError: the prepared folder's bucket is unreachable"}
    for name, tensor in classifier.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], tensor, rtol=0, atol=0)
    assert f"saved UNCALIBRATED to {cfg.output}" in caplog.text and f"spamray calibrate {cfg.output}" in caplog.text
