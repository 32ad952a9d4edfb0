"""Shared fixtures: real SMS messages and GPT-2 checkpoints generated in the published format."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def sms_messages() -> list[str]:
    text = (resources.files("spamray") / "data" / "SMSSpamCollection").read_text(encoding="utf-8")
    return [row[1] for row in csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)]


def write_hf_checkpoint(folder: Path, n_embd: int, n_layer: int, n_head: int, seed: int = 0):
    """A random-weight GPT-2 written by transformers itself (config.json + model.safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def small_hf_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-small")
    model = write_hf_checkpoint(folder, n_embd=64, n_layer=2, n_head=4)
    return folder, model


@pytest.fixture(scope="session")
def gpt2_small_hf_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-gpt2-small")
    model = write_hf_checkpoint(folder, n_embd=768, n_layer=12, n_head=12, seed=1)
    return folder, model


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds), shut down at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared_sms(tmp_path_factory) -> str:
    from spamray.config import PrepareConfig
    from spamray.prepare import prepare

    folder = tmp_path_factory.mktemp("prepared") / "sms"
    prepare(PrepareConfig(output=str(folder)), log=lambda *_: None)
    return str(folder)
