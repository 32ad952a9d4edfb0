"""The saved-classifier folder: `model.safetensors` + `spamray.json`, local or at any fsspec URL.

Nothing here unpickles. `spamray.json` is written last, so its presence marks a folder as
complete; it records the sha256 of the weights, so any later change to them is caught.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from . import __version__, storage
from .errors import SpamrayError
from .tokenizer import tokenizer_identity

FORMAT = "spamray-classifier"
FORMAT_VERSION = 1
METADATA_FILE = "spamray.json"
WEIGHTS_FILE = "model.safetensors"


class SavedClassifierError(SpamrayError, ValueError):
    """A saved-classifier folder that cannot be used, and why."""


def write_saved(url: str, metadata: dict, state_dict: dict[str, torch.Tensor], overwrite: bool = False,
                extra_files: dict[str, bytes] | None = None) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        save_file({name: t.detach().contiguous().cpu() for name, t in state_dict.items()}, folder / WEIGHTS_FILE)
        weights_sha = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spamray_version": __version__,
            "tokenizer": tokenizer_identity(),
            "weights": {"file": WEIGHTS_FILE, "sha256": weights_sha},
            **metadata,
        }
        for name, data in (extra_files or {}).items():
            (folder / name).write_bytes(data)
        (folder / METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        storage.publish_folder(folder, url, commit_file=METADATA_FILE, overwrite=overwrite)


def read_metadata(url: str) -> dict:
    """The checked `spamray.json` of a saved classifier (no weights read)."""
    metadata_url = storage.join(url, METADATA_FILE)
    if not storage.exists(metadata_url):
        what = "does not exist" if not storage.exists(url) else f"has no {METADATA_FILE}"
        raise SavedClassifierError(
            f"{url} is not a spamray classifier: it {what}. A saved classifier is the folder that "
            "`spamray train --output` (or TextClassifier.save) wrote; an incomplete save has no spamray.json."
        )
    try:
        metadata = json.loads(storage.read_bytes(metadata_url))
    except json.JSONDecodeError as error:
        raise SavedClassifierError(f"{metadata_url} is not valid JSON ({error})") from error
    if metadata.get("format") != FORMAT:
        raise SavedClassifierError(f"{metadata_url} is not a spamray classifier (format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise SavedClassifierError(
            f"{url} has format version {metadata.get('format_version')!r}; this spamray ({__version__}) reads "
            f"version {FORMAT_VERSION}. Use the spamray release that wrote it, or re-save it."
        )
    if metadata.get("tokenizer") != tokenizer_identity():
        raise SavedClassifierError(f"{url} was trained with another tokenizer: {metadata.get('tokenizer')}")
    weights_file = (metadata.get("weights") or {}).get("file")
    if weights_file != WEIGHTS_FILE:  # joined to the folder's URL: anything else could read any file
        raise SavedClassifierError(f"{metadata_url}: weights.file is {weights_file!r}; a spamray classifier keeps its "
                                   f"weights in {WEIGHTS_FILE!r} beside {METADATA_FILE}, and nowhere else")
    return metadata


def read_file(url: str, name: str) -> bytes:
    """A file the folder's spamray.json names beside the weights (an ONNX graph)."""
    file_url = storage.join(url, name)
    if not storage.exists(file_url):
        raise SavedClassifierError(f"{url} is incomplete: {name} is missing")
    return storage.read_bytes(file_url)


def model_version(metadata: dict) -> str:
    """Names what scores: the weights, and the calibration and operating point when there are
    any (an uncalibrated classifier is named by the sha256 of its weights alone)."""
    weights = metadata["weights"]["sha256"]
    calibration = {key: metadata[key] for key in ("temperature", "operating_point")}
    if calibration["temperature"] == 1.0 and calibration["operating_point"] is None:
        return weights[:16]
    return hashlib.sha256((weights + json.dumps(calibration, sort_keys=True)).encode()).hexdigest()[:16]


def read_saved(url: str, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and weights of a saved classifier, each tensor checked against `expected`.

    `expected` maps tensor name -> (shape, dtype) of the model the metadata describes.
    """
    metadata = read_metadata(url)
    weights_url = storage.join(url, metadata["weights"]["file"])
    if not storage.exists(weights_url):
        raise SavedClassifierError(f"{url} is incomplete: {metadata['weights']['file']} is missing")
    data = storage.read_bytes(weights_url)
    try:
        tensors = load_safetensors_bytes(data)
    except SafetensorError as error:
        raise SavedClassifierError(f"{weights_url} is not a readable safetensors file ({error})") from error
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            raise SavedClassifierError(f"{weights_url} is missing tensor {name!r}")
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise SavedClassifierError(f"{weights_url}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.dtype != dtype:
            raise SavedClassifierError(f"{weights_url}: tensor {name!r} has dtype {tensor.dtype}, expected {dtype}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise SavedClassifierError(f"{weights_url} has tensors the model does not have: {unexpected[:5]}")
    if hashlib.sha256(data).hexdigest() != metadata["weights"]["sha256"]:
        raise SavedClassifierError(
            f"{weights_url} does not match the sha256 recorded in {METADATA_FILE}: it was changed after saving"
        )
    return metadata, tensors
