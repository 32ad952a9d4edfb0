"""Loading the published GPT-2 weights (Hugging Face checkpoint format) into `GPTModel`.

A checkpoint is a folder (local or any fsspec URL) holding `config.json` and
`model.safetensors` (or `pytorch_model.bin`, read with `weights_only=True`). The four published
names download from the Hugging Face hub with `huggingface_hub`: at a pinned commit (a file at a
commit never changes), streamed to disk into the standard Hugging Face cache, and verified
against the hub's hashes on every load, cached or not.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from . import storage
from .errors import SpamrayError
from .model import GPTConfig, GPTModel, preset_config


@dataclass(frozen=True)
class Published:
    preset: str
    revision: str  # the hub commit spamray downloads: its files never change
    sha256: str | None  # of model.safetensors at that commit, where recorded here


# The `main` commits of openai-community's GPT-2 repositories and the sha256 (LFS oid) of their
# model.safetensors, as published by the hub; gpt2-medium's is checked against the hub's own
# record only (no copy recorded here).
PUBLISHED = {
    "gpt2": Published("gpt2-small", "607a30d783dfa663caf39e06633721c8d4cfcd7e",
                      "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
    "gpt2-medium": Published("gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da", None),
    "gpt2-large": Published("gpt2-large", "32b71b12589c2f8d625668d2335a01cac3249519",
                            "5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce"),
    "gpt2-xl": Published("gpt2-xl", "15ea56dee5df4983c59b2538573817e1667135e2",
                         "0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a"),
}
HUB_REPO = "openai-community/{name}"
CHECKPOINT_FILES = ("config.json", "model.safetensors")

# Tensors some checkpoints carry that are not weights: the causal-mask buffers of older
# transformers versions, and the language-model head, which GPT-2 ties to the embedding.
_NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


class CheckpointMismatch(SpamrayError, KeyError):
    """A checkpoint whose tensors are not GPT-2's."""

    def __str__(self) -> str:  # a KeyError's text is its argument's repr: show the message itself
        return str(self.args[0]) if self.args else ""


class WeightsDownloadError(SpamrayError, RuntimeError):
    """A published checkpoint that could not be downloaded or did not verify, and what to do."""


def load_gpt2(source: str, preset: str | None = None, revision: str | None = None) -> GPTModel:
    """A GPT-2 language model from a checkpoint folder/URL, a published name, or "random".

    `preset` names the config for "random" (default gpt2-small); for a checkpoint it is an
    optional check that the checkpoint has that architecture. `revision` replaces the pinned
    hub commit of a published name.
    """
    source = str(source)
    if source == "random":
        return GPTModel(preset_config(preset or "gpt2-small"))
    if source in PUBLISHED:
        if preset is not None and preset != PUBLISHED[source].preset:
            raise ValueError(f"{source} is the {PUBLISHED[source].preset} architecture, not {preset}")
        preset = PUBLISHED[source].preset
        source = str(download_published(source, revision))
    elif revision is not None:
        raise ValueError(f"a revision applies to the published names ({', '.join(PUBLISHED)}), not to {source}")
    model = _load_checkpoint(source)
    if preset is not None and model.cfg != preset_config(preset):
        raise ValueError(f"checkpoint {source} has config {model.cfg}, which is not the preset {preset}")
    return model


def download_published(name: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a published checkpoint at `revision` (default: the pinned
    commit), downloaded on first use into the Hugging Face cache (HF_HOME / HF_HUB_CACHE;
    HF_HUB_OFFLINE=1 reads only the cache) and verified on every call."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RevisionNotFoundError

    published = PUBLISHED[name]
    revision = revision or published.revision
    repo = HUB_REPO.format(name=name)
    paths = {}
    for file in CHECKPOINT_FILES:
        try:
            paths[file] = Path(hf_hub_download(repo, file, revision=revision))
        except RevisionNotFoundError as error:
            raise WeightsDownloadError(f"{repo} has no revision {revision!r} on the hub; give a commit of it "
                                       f"(spamray pins {published.revision})") from error
        except Exception as error:  # network, offline mode, a missing file: say what to do instead
            raise WeightsDownloadError(
                f"could not download {file} of {name} at {revision} from the hub ({type(error).__name__}: {error}). "
                f"Without network access, fetch config.json and model.safetensors of {repo} on another machine and "
                f"pass their folder instead of the name (for example --weights /path/to/{name}), or copy a Hugging "
                "Face cache that holds them (HF_HOME) and set HF_HUB_OFFLINE=1.") from error
    pinned = published.sha256 if revision == published.revision else None
    for file, path in paths.items():
        verify_hub_file(path, pinned if file == "model.safetensors" else None)
    return paths["config.json"].parent


def verify_hub_file(path: Path, pinned_sha256: str | None = None) -> None:
    """Checks a file in the Hugging Face cache against the hash the hub gave for it: its blob is
    named by its ETag, the sha256 of a large (LFS) file or the git blob sha1 of a small one. A
    file that does not match is removed, so that the next call downloads it again."""
    blob = path.resolve()
    expected = blob.name
    if len(expected) == 64:
        actual = file_sha256(blob)
    elif len(expected) == 40:
        digest = hashlib.sha1(b"blob %d\0" % blob.stat().st_size)
        with open(blob, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        actual = digest.hexdigest()
    else:
        raise WeightsDownloadError(f"{path}: the hub gave no hash for it (ETag {expected!r}); cannot verify it")
    problems = []
    if actual != expected:
        problems.append(f"its hash is {actual}, the hub's is {expected}")
    if pinned_sha256 is not None and len(expected) == 64 and actual != pinned_sha256:
        problems.append(f"its sha256 is {actual}, spamray's pinned one is {pinned_sha256}")
    if problems:
        blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise WeightsDownloadError(f"{path.name} of {path.parent} is corrupted ({'; '.join(problems)}); it was "
                                   "removed from the cache: run again to download it anew")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_checkpoint(url: str) -> GPTModel:
    config_url = storage.join(url, "config.json")
    if not storage.exists(config_url):
        raise FileNotFoundError(
            f"{url} is not a GPT-2 checkpoint: it has no config.json. Pass a folder with config.json and "
            "model.safetensors, one of gpt2, gpt2-medium, gpt2-large, gpt2-xl, or 'random'."
        )
    cfg = config_from_hf(json.loads(storage.read_bytes(config_url)), where=config_url)
    model = GPTModel(cfg)
    model.load_state_dict(convert_hf_state_dict(_read_state_dict(url), cfg), strict=True)
    model.out_head.weight = model.tok_emb.weight
    return model


def config_from_hf(hf: dict, where: str) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{where}: model_type is {hf.get('model_type')!r}, not 'gpt2'")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{where}: activation {hf['activation_function']!r} is not GPT-2's tanh GELU")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{where}: n_inner {hf['n_inner']} is not 4 x n_embd as in GPT-2")
    return GPTConfig(
        emb_dim=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        vocab_size=hf["vocab_size"],
        context_length=hf["n_positions"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _read_state_dict(url: str) -> dict[str, torch.Tensor]:
    safetensors_url = storage.join(url, "model.safetensors")
    if storage.exists(safetensors_url):
        if storage.is_local(safetensors_url):  # memory-mapped: no second copy of the file in memory
            return load_file(storage.local_path(safetensors_url))
        return load_safetensors_bytes(storage.read_bytes(safetensors_url))
    bin_url = storage.join(url, "pytorch_model.bin")
    if storage.exists(bin_url):
        with tempfile.NamedTemporaryFile(suffix=".bin") as local:
            local.write(storage.read_bytes(bin_url))
            local.flush()
            return torch.load(local.name, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{url} has config.json but neither model.safetensors nor pytorch_model.bin")


def convert_hf_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Renames (and transposes, for GPT-2's Conv1D layers) HF tensors into GPTModel's names.

    Every expected tensor must be present with its expected shape; the error names the tensor.
    """
    weights = {name.removeprefix("transformer."): tensor for name, tensor in hf.items() if not name.endswith(_NOT_WEIGHTS)}
    expected = _expected_shapes(cfg)
    converted = {}
    for ours, (theirs, transpose) in _name_map(cfg).items():
        if theirs not in weights:
            raise CheckpointMismatch(f"checkpoint is missing tensor {theirs!r} (needed for {ours})")
        tensor = weights.pop(theirs)
        tensor = tensor.t() if transpose else tensor
        if tuple(tensor.shape) != expected[ours]:
            raise ValueError(f"tensor {theirs!r} has shape {tuple(tensor.shape)}, expected {expected[ours]} for {ours}")
        converted[ours] = tensor.to(torch.float32).contiguous()
    if weights:
        raise CheckpointMismatch(f"checkpoint has tensors GPT-2 does not use: {sorted(weights)[:5]}")
    converted["out_head.weight"] = converted["tok_emb.weight"]
    return converted


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in GPTModel(cfg).state_dict().items()}


def _name_map(cfg: GPTConfig) -> dict[str, tuple[str, bool]]:
    """Our tensor name -> (HF tensor name, whether HF stores it transposed)."""
    names = {
        "tok_emb.weight": ("wte.weight", False),
        "pos_emb.weight": ("wpe.weight", False),
        "final_norm.weight": ("ln_f.weight", False),
        "final_norm.bias": ("ln_f.bias", False),
    }
    per_block = {
        "norm1": ("ln_1", False),
        "att.qkv": ("attn.c_attn", True),
        "att.out_proj": ("attn.c_proj", True),
        "norm2": ("ln_2", False),
        "ff.fc": ("mlp.c_fc", True),
        "ff.proj": ("mlp.c_proj", True),
    }
    for block in range(cfg.n_layers):
        for ours, (theirs, is_conv1d) in per_block.items():
            names[f"trf_blocks.{block}.{ours}.weight"] = (f"h.{block}.{theirs}.weight", is_conv1d)
            names[f"trf_blocks.{block}.{ours}.bias"] = (f"h.{block}.{theirs}.bias", False)
    return names
