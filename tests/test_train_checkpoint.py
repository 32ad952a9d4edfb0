"""Training checkpoints: whole or refused, a resume from the newest whole one, and a copy of
its own for each reader (no Ray cluster needed: Ray Train's Checkpoint class on plain folders)."""

import logging
import threading

import pyarrow.fs
import pytest
import torch
from ray.train import Checkpoint

from spamray.train_checkpoint import (MANIFEST_FILE, STATE_FILE, CheckpointNotWhole, read_checkpoint,
                                      read_newest_whole, write_checkpoint)


def a_checkpoint(run_folder, name: str, epoch: int, state_bytes: int = 1000):
    folder = run_folder / name
    folder.mkdir(parents=True)
    tensors = {"w": torch.full((4, 4), float(epoch))}
    write_checkpoint(folder, tensors, {"epoch": epoch, "padding": torch.zeros(state_bytes // 4)})
    return Checkpoint(str(folder))


def test_a_cut_short_latest_checkpoint_resumes_from_the_one_before_with_a_warning(tmp_path, caplog):
    first = a_checkpoint(tmp_path / "run", "checkpoint_2026-12-02_08-00-00.000001", epoch=1)
    latest = a_checkpoint(tmp_path / "run", "checkpoint_2026-12-02_08-01-00.000001", epoch=2)
    tensors, state = read_checkpoint(latest)
    assert state["epoch"] == 2 and torch.equal(tensors["w"], torch.full((4, 4), 2.0))
    state_file = tmp_path / "run" / "checkpoint_2026-12-02_08-01-00.000001" / STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:500])  # cut short, as an upload that never finished
    with pytest.raises(CheckpointNotWhole, match=f"{STATE_FILE} differs from its digest"):
        read_checkpoint(latest)
    with caplog.at_level(logging.WARNING):
        tensors, state, warning = read_newest_whole(latest)
    assert state["epoch"] == 1 and torch.equal(tensors["w"], torch.full((4, 4), 1.0))
    assert latest.path in warning and first.path in warning and warning in caplog.text


def test_a_checkpoint_without_its_manifest_is_not_whole_and_nothing_earlier_fails_clearly(tmp_path):
    only = a_checkpoint(tmp_path / "run", "checkpoint_2026-12-02_08-00-00.000001", epoch=1)
    (tmp_path / "run" / "checkpoint_2026-12-02_08-00-00.000001" / MANIFEST_FILE).unlink()
    a_checkpoint(tmp_path / "run", "checkpoint_2026-12-02_09-00-00.000001", epoch=9)  # newer: never a fallback
    with pytest.raises(CheckpointNotWhole, match="has no manifest.json.*no earlier checkpoint of this run reads whole"):
        read_newest_whole(only)


def test_each_reader_reads_a_copy_of_its_own_while_others_download_the_shared_one(tmp_path):
    # A filesystem that is not LocalFileSystem, as S3 is: Ray downloads its checkpoints into one
    # folder per checkpoint shared by the node's processes, and downloads again in place when
    # another process asks (truncating the files under a reader).
    a_checkpoint(tmp_path / "store", "checkpoint_2026-12-02_08-00-00.000001", epoch=3, state_bytes=8_000_000)
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "store"), pyarrow.fs.LocalFileSystem())
    checkpoint = Checkpoint("checkpoint_2026-12-02_08-00-00.000001", filesystem=remote)
    stop = threading.Event()

    def another_worker_on_this_node():
        while not stop.is_set():
            checkpoint.to_directory()  # what as_directory() does in every other worker

    other = threading.Thread(target=another_worker_on_this_node)
    other.start()
    try:
        for _ in range(5):
            tensors, state = read_checkpoint(checkpoint)
            assert state["epoch"] == 3 and state["padding"].numel() == 2_000_000
    finally:
        stop.set()
        other.join()


@pytest.mark.parametrize("manifest, problem", [
    ('{"epoch": 2, "sha256": {"model.saf', "is not whole JSON"),
    ('{"epoch": 2}', "names no digests"),
    ('{"epoch": 2, "sha256": {}}', "names no digests"),
    ('{"epoch": 2, "sha256": {"model.safetensors": "", "train_state.pt": ""}}', "has no digest for model.safetensors"),
    ('["not", "a", "manifest"]', "names no digests"),
])
def test_a_latest_manifest_that_vouches_for_nothing_falls_back_to_the_one_before(tmp_path, manifest, problem):
    first = a_checkpoint(tmp_path / "run", "checkpoint_2026-12-02_08-00-00.000001", epoch=1)
    latest = a_checkpoint(tmp_path / "run", "checkpoint_2026-12-02_08-01-00.000001", epoch=2)
    (tmp_path / "run" / "checkpoint_2026-12-02_08-01-00.000001" / MANIFEST_FILE).write_text(manifest)
    with pytest.raises(CheckpointNotWhole, match=problem):
        read_checkpoint(latest)
    tensors, state, warning = read_newest_whole(latest)
    assert state["epoch"] == 1 and torch.equal(tensors["w"], torch.full((4, 4), 1.0)) and first.path in warning
