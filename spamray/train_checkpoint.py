"""Training checkpoints that are whole or refused, and a resume from the newest whole one.

A checkpoint folder holds the weights, the training state (optimizer, epoch, history) and,
written after them, a manifest of their sha256 digests; every read checks the files against
it. When the latest checkpoint Ray Train registered does not read whole, the run resumes from
the newest one before it that does (CheckpointConfig keeps two), with a warning naming both.

Each read copies the checkpoint into a folder of its own. Ray 2.60's `Checkpoint.as_directory()`
shares one folder per checkpoint among a node's processes, and a process that asks after the
download finished downloads it again into that same folder (`Checkpoint.to_directory` takes
its lock, then copies over the files in place), truncating a file another worker is reading:
a resume's `torch.load` then fails with "file read failed".
"""

from __future__ import annotations

import json
import logging
import posixpath
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import SpamrayError
from .weights import file_sha256

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE)  # what the manifest vouches for


class CheckpointNotWhole(SpamrayError):
    """A checkpoint's files are missing or differ from its manifest."""


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Weights and training state into `folder`, then the manifest that vouches for them."""
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, folder / MODEL_FILE)
    torch.save(state, folder / STATE_FILE)
    manifest = {"epoch": state["epoch"], "sha256": {name: file_sha256(folder / name) for name in CHECKPOINT_FILES}}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def read_checkpoint(checkpoint) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, training state) of a Ray Train checkpoint, checked against its manifest."""
    with tempfile.TemporaryDirectory(prefix="spamray-checkpoint-") as folder:
        checkpoint.to_directory(folder)  # a copy of our own: see the module docstring
        check_whole(Path(folder), checkpoint.path)
        return load_file(Path(folder) / MODEL_FILE), torch.load(Path(folder) / STATE_FILE, weights_only=True)


def check_whole(folder: Path, where: str) -> None:
    """Raises CheckpointNotWhole unless the manifest is whole and vouches, by a digest each, for
    the weights and the training state as they are."""
    for name, digest in manifest_digests(folder / MANIFEST_FILE, where).items():
        if not (folder / name).exists():
            raise CheckpointNotWhole(f"checkpoint {where} lacks {name}, which its {MANIFEST_FILE} names")
        if file_sha256(folder / name) != digest:
            raise CheckpointNotWhole(f"checkpoint {where}: {name} differs from its digest in {MANIFEST_FILE} "
                                     "(cut short or changed after it was written)")


def manifest_digests(manifest: Path, where: str) -> dict[str, str]:
    """The manifest's digest of each checkpoint file. A manifest cut short, or one that names no
    digest for a file, proves nothing: the checkpoint is not whole (and the one before is read)."""
    if not manifest.exists():
        raise CheckpointNotWhole(f"checkpoint {where} has no {MANIFEST_FILE}: its writing never finished (or a spamray "
                                 "before checkpoint manifests wrote it: start the run afresh with another --run-name)")
    try:
        content = json.loads(manifest.read_text())
    except ValueError:  # cut short while it was written
        raise CheckpointNotWhole(f"checkpoint {where}: its {MANIFEST_FILE} is not whole JSON (cut short?)") from None
    digests = content.get("sha256") if isinstance(content, dict) else None
    if not isinstance(digests, dict) or not digests:
        raise CheckpointNotWhole(f"checkpoint {where}: its {MANIFEST_FILE} names no digests")
    for name in CHECKPOINT_FILES:
        if not isinstance(digests.get(name), str) or not digests[name]:
            raise CheckpointNotWhole(f"checkpoint {where}: its {MANIFEST_FILE} has no digest for {name}")
    return {name: digests[name] for name in CHECKPOINT_FILES}


def read_newest_whole(checkpoint) -> tuple[dict[str, torch.Tensor], dict, str | None]:
    """(weights, training state, a warning or None) from `checkpoint`, the latest registered, or
    else from the newest earlier checkpoint of the same run that reads whole."""
    try:
        return (*read_checkpoint(checkpoint), None)
    except CheckpointNotWhole as error:
        for earlier in earlier_checkpoints(checkpoint):
            try:
                tensors, state = read_checkpoint(earlier)
            except CheckpointNotWhole:
                continue
            warning = (f"the latest checkpoint {checkpoint.path} cannot be used ({error}); resumed from the one before "
                       f"it, {earlier.path} (epoch {state['epoch']})")
            logger.warning(warning)
            return tensors, state, warning
        raise CheckpointNotWhole(f"{error}; and no earlier checkpoint of this run reads whole") from error


def earlier_checkpoints(checkpoint) -> list:
    """The run's other checkpoints older than `checkpoint`, newest first (Ray Train names their
    folders checkpoint_<date and time>, so names sort by age)."""
    import pyarrow.fs
    from ray.train import Checkpoint

    run_folder, latest = posixpath.split(checkpoint.path.rstrip("/"))
    entries = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(run_folder))
    names = sorted((posixpath.basename(entry.path) for entry in entries if entry.type == pyarrow.fs.FileType.Directory),
                   reverse=True)
    return [Checkpoint(posixpath.join(run_folder, name), filesystem=checkpoint.filesystem)
            for name in names if name.startswith("checkpoint_") and name < latest]
