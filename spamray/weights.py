"""Loading the published GPT-2 weights (Hugging Face checkpoint format) into `GPTModel`.

A checkpoint is a folder (local or any fsspec URL) holding `config.json` and
`model.safetensors` (or `pytorch_model.bin`, read with `weights_only=True`). The four published
names download from the Hugging Face hub once and are then read from the local cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes

from . import storage
from .model import GPTConfig, GPTModel, preset_config

PUBLISHED = {"gpt2": "gpt2-small", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl"}
HUB_URL = "https://huggingface.co/openai-community/{name}/resolve/main"
CHECKPOINT_FILES = ("config.json", "model.safetensors")

# Tensors some checkpoints carry that are not weights: the causal-mask buffers of older
# transformers versions, and the language-model head, which GPT-2 ties to the embedding.
_NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


def load_gpt2(source: str, preset: str | None = None) -> GPTModel:
    """A GPT-2 language model from a checkpoint folder/URL, a published name, or "random".

    `preset` names the config for "random" (default gpt2-small); for a checkpoint it is an
    optional check that the checkpoint has that architecture.
    """
    source = str(source)
    if source == "random":
        return GPTModel(preset_config(preset or "gpt2-small"))
    if source in PUBLISHED:
        if preset is not None and preset != PUBLISHED[source]:
            raise ValueError(f"{source} is the {PUBLISHED[source]} architecture, not {preset}")
        preset = PUBLISHED[source]
        source = str(download_published(source))
    model = _load_checkpoint(source)
    if preset is not None and model.cfg != preset_config(preset):
        raise ValueError(f"checkpoint {source} has config {model.cfg}, which is not the preset {preset}")
    return model


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spamray"
    return Path(os.environ.get("SPAMRAY_CACHE_DIR", default))


def download_published(name: str) -> Path:
    """The local folder of a published checkpoint, downloaded on first use."""
    folder = cache_dir() / "gpt2" / name
    if all((folder / file).exists() for file in CHECKPOINT_FILES):
        return folder
    url = HUB_URL.format(name=name)
    folder.mkdir(parents=True, exist_ok=True)
    for file in CHECKPOINT_FILES:
        try:
            data = storage.read_bytes(f"{url}/{file}")
        except Exception as error:  # any transport failure: say what to do instead
            raise RuntimeError(
                f"could not download {file} of {name} from {url} ({type(error).__name__}: {error}). "
                f"Without network access, fetch config.json and model.safetensors of '{name}' on another "
                f"machine and pass their folder instead of the name (for example --weights /path/to/{name})."
            ) from error
        storage.write_bytes(str(folder / file), data)
    return folder


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
            raise KeyError(f"checkpoint is missing tensor {theirs!r} (needed for {ours})")
        tensor = weights.pop(theirs)
        tensor = tensor.t() if transpose else tensor
        if tuple(tensor.shape) != expected[ours]:
            raise ValueError(f"tensor {theirs!r} has shape {tuple(tensor.shape)}, expected {expected[ours]} for {ours}")
        converted[ours] = tensor.to(torch.float32).contiguous()
    if weights:
        raise KeyError(f"checkpoint has tensors GPT-2 does not use: {sorted(weights)[:5]}")
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
