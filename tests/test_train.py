"""Fine-tuning on Ray Train: two workers, recovery from a checkpoint, pretrained weights by path."""

import json

import numpy as np
import torch
from safetensors.torch import load_file

from spamray import TextClassifier
from spamray.cli import main
from spamray.config import TrainConfig
from spamray.train import train


def tiny_config(tmp_path, prepared, **overrides):
    settings = dict(data=prepared, output=str(tmp_path / "model"), weights="random", preset="gpt2-tiny",
                    trainable="all", learning_rate=5e-4, epochs=1, eval_freq=10, num_workers=2,
                    cpus_per_worker=1, storage_path=str(tmp_path / "runs"))
    return TrainConfig(**{**settings, **overrides})


def test_two_workers_learn_and_stay_identical(ray_local, prepared_sms, tmp_path):
    metrics = train(tiny_config(tmp_path, prepared_sms), log=lambda *_: None)
    losses = metrics["history"]["train_losses"]
    assert len(losses) >= 5
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])  # the loss falls
    digests = metrics["training"]["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # DDP kept both replicas identical
    assert metrics["test_accuracy"] > 0.8
    saved = TextClassifier.load(str(tmp_path / "model"))
    assert saved.metrics["test_accuracy"] == metrics["test_accuracy"]
    for plot in ("loss.png", "accuracy.png"):
        assert (tmp_path / "model" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_worker_resumes_from_the_last_checkpoint(ray_local, prepared_sms, tmp_path):
    # One worker, 130 steps an epoch (1,045 // 8): fail once in epoch 2, after the first checkpoint.
    cfg = tiny_config(tmp_path, prepared_sms, epochs=2, num_workers=1, cpus_per_worker=2,
                      fail_once_at_step=140, max_failures=1)
    metrics = train(cfg, log=lambda *_: None)
    training = metrics["training"]
    assert training["resumed_from_epoch"] == 1  # restarted from epoch 1's checkpoint, not step 0
    assert training["global_step"] == 2 * 130 - 1  # no step run twice in the count
    assert training["examples_seen"] == 2 * 130 * 8
    assert (tmp_path / "runs" / metrics["settings"]["run_name"] / "fault-drill-step-140").exists()

    # Started again with the same settings after it finished: nothing is trained twice.
    again = train(TrainConfig(**{**vars(cfg), "output": str(tmp_path / "model-again")}), log=lambda *_: None)
    assert again["training"]["global_step"] == 2 * 130 - 1 and again["training"]["examples_seen"] == 2 * 130 * 8
    assert again["test_accuracy"] == metrics["test_accuracy"]


def test_pretrained_weights_by_path_through_the_cli(ray_local, prepared_sms, small_hf_checkpoint, tmp_path):
    folder, reference = small_hf_checkpoint
    code = main(["train", "--data", prepared_sms, "--output", str(tmp_path / "model"), "--weights", str(folder),
                 "--epochs", "1", "--eval-freq", "20", "--storage-path", str(tmp_path / "runs")])
    assert code == 0
    tensors = load_file(tmp_path / "model" / "model.safetensors")
    # last_block (the book's policy) froze the embedding and first block: they are the checkpoint's.
    torch.testing.assert_close(tensors["gpt.tok_emb.weight"], reference.transformer.wte.weight, rtol=0, atol=0)
    torch.testing.assert_close(tensors["gpt.trf_blocks.0.att.qkv.weight"], reference.transformer.h[0].attn.c_attn.weight.t(), rtol=0, atol=0)
    assert not torch.equal(tensors["gpt.trf_blocks.1.ff.fc.weight"], reference.transformer.h[1].mlp.c_fc.weight.t())
    metadata = json.loads((tmp_path / "model" / "spamray.json").read_text())
    assert metadata["trainable"] == "last_block" and metadata["labels"] == ["not spam", "spam"]

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
