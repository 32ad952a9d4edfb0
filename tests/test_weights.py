"""GPT-2 weight import, checked against transformers' own GPT-2 on the same weights."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import spamray
from spamray.model import PRESETS, count_parameters


def padded_batch(messages, lengths_pad):
    """Real SMS messages, right-padded with 50256 to a shared width, each to a different length."""
    tok = spamray.get_tokenizer()
    rows = [tok.encode(m) for m in messages]
    return torch.from_numpy(tok.pad(rows, length=max(map(len, rows)) + lengths_pad)[0])


def assert_same_logits(ours, theirs, token_ids):
    with torch.no_grad():
        expected = theirs(token_ids).logits
        got = ours.eval()(token_ids)
    assert got.shape == expected.shape == (*token_ids.shape, 50257)
    assert (got - expected).abs().max().item() <= 1e-4


def test_small_checkpoint_matches_transformers(small_hf_checkpoint, sms_messages):
    folder, reference = small_hf_checkpoint
    model = spamray.load_gpt2(str(folder))
    assert model.cfg.emb_dim == 64 and model.cfg.n_layers == 2
    assert_same_logits(model, reference, padded_batch(sms_messages[:6], lengths_pad=5))


def test_gpt2_small_architecture_matches_transformers(gpt2_small_hf_checkpoint, sms_messages):
    folder, reference = gpt2_small_hf_checkpoint
    model = spamray.load_gpt2(str(folder), preset="gpt2-small")
    assert count_parameters(model) == 124_439_808  # GPT-2 small, LM head tied to the embedding
    assert_same_logits(model, reference, padded_batch(sms_messages[10:14], lengths_pad=3))


def test_pytorch_model_bin_is_read_without_unpickling_code(small_hf_checkpoint, tmp_path, sms_messages):
    folder, reference = small_hf_checkpoint
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    torch.save(load_file(folder / "model.safetensors"), tmp_path / "pytorch_model.bin")
    assert_same_logits(spamray.load_gpt2(str(tmp_path)), reference, padded_batch(sms_messages[:3], 0))


def test_fsspec_url_source(small_hf_checkpoint, sms_messages):
    folder, reference = small_hf_checkpoint
    assert_same_logits(spamray.load_gpt2(f"file://{folder}"), reference, padded_batch(sms_messages[:2], 1))


# The hub on loopback (tests/loopback_hub.py) at a commit of its own: huggingface_hub reads
# HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when imported, so each case runs in a fresh process.
FETCH = """
import json, sys
from spamray.weights import WeightsDownloadError, download_published
try:
    folder = download_published("gpt2", revision=sys.argv[1])
    print(json.dumps({"folder": str(folder)}))
except WeightsDownloadError as error:
    print(json.dumps({"error": str(error)}))
"""
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(small_hf_checkpoint):
    from loopback_hub import LoopbackHub

    folder, _ = small_hf_checkpoint
    served = LoopbackHub()
    served.repos["openai-community/gpt2"] = {COMMIT: {name: (folder / name).read_bytes()
                                                      for name in ("config.json", "model.safetensors")}}
    yield served
    served.close()


def fetch(hub, hf_home, revision=COMMIT, offline=False) -> dict:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    run = subprocess.run([sys.executable, "-c", FETCH, revision], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_published_checkpoint_downloads_at_its_commit_into_the_hf_cache_and_verifies(hub, small_hf_checkpoint,
                                                                                      tmp_path):
    folder, _ = small_hf_checkpoint
    got = fetch(hub, tmp_path / "hf")
    snapshot = Path(got["folder"])
    assert snapshot == tmp_path / "hf" / "hub" / "models--openai-community--gpt2" / "snapshots" / COMMIT
    for name in ("config.json", "model.safetensors"):
        assert (snapshot / name).read_bytes() == (folder / name).read_bytes()
    assert any(f"/resolve/{COMMIT}/model.safetensors" in request for request in hub.requests)

    # Cached: read offline, and checked again. A cached file that changed is caught and removed,
    # and the next run downloads it anew.
    assert fetch(hub, tmp_path / "hf", offline=True) == got
    blob = (snapshot / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert "model.safetensors" in fetch(hub, tmp_path / "hf", offline=True)["error"]
    assert not blob.exists()
    assert fetch(hub, tmp_path / "hf") == got and blob.read_bytes() == (folder / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_corrupted_download_is_refused_and_not_kept(hub, small_hf_checkpoint, tmp_path):
    folder, _ = small_hf_checkpoint
    good = (folder / "model.safetensors").read_bytes()
    hub.corrupt[("openai-community/gpt2", COMMIT, "model.safetensors")] = good[:-1] + bytes([good[-1] ^ 0xFF])
    error = fetch(hub, tmp_path / "hf")["error"]
    assert "model.safetensors" in error and "is corrupted" in error and "the hub's is" in error
    blobs = tmp_path / "hf" / "hub" / "models--openai-community--gpt2" / "blobs"
    assert [blob.name for blob in blobs.iterdir() if len(blob.name) == 64] == []  # the bad one is gone


@pytest.mark.slow
def test_a_missing_revision_and_no_network_say_what_to_do(hub, tmp_path):
    missing = "f" * 40
    assert f"has no revision '{missing}' on the hub" in fetch(hub, tmp_path / "hf", revision=missing)["error"]
    offline = fetch(hub, tmp_path / "hf", offline=True)["error"]  # nothing cached yet
    assert "could not download config.json of gpt2" in offline and "HF_HUB_OFFLINE=1" in offline


def test_the_pinned_sha256_is_checked_on_top_of_the_hubs(tmp_path):
    from spamray.weights import PUBLISHED, WeightsDownloadError, verify_hub_file

    data = b"weights" * 1000
    blob = tmp_path / hashlib.sha256(data).hexdigest()  # a blob named by the hub's ETag, as cached
    blob.write_bytes(data)
    verify_hub_file(blob, pinned_sha256=None)
    with pytest.raises(WeightsDownloadError, match="spamray's pinned one is 248dfc39"):
        verify_hub_file(blob, pinned_sha256=PUBLISHED["gpt2"].sha256)
    assert all(len(p.revision) == 40 for p in PUBLISHED.values())


def test_a_revision_applies_only_to_published_names(small_hf_checkpoint):
    folder, _ = small_hf_checkpoint
    with pytest.raises(ValueError, match="a revision applies to the published names"):
        spamray.load_gpt2(str(folder), revision=COMMIT)


def test_mismatches_name_the_tensor(small_hf_checkpoint, tmp_path):
    folder, _ = small_hf_checkpoint
    tensors = load_file(folder / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")

    broken = dict(tensors)
    del broken["transformer.h.1.mlp.c_fc.weight"]
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="h.1.mlp.c_fc.weight"):
        spamray.load_gpt2(str(tmp_path))

    broken = dict(tensors)
    broken["transformer.h.0.attn.c_attn.weight"] = torch.zeros(64, 64)
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"h.0.attn.c_attn.weight.*\(64, 64\)"):
        spamray.load_gpt2(str(tmp_path))

    with pytest.raises(ValueError, match="not the preset gpt2-small"):
        shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
        spamray.load_gpt2(str(tmp_path), preset="gpt2-small")


def test_random_and_unknown_sources(tmp_path):
    assert spamray.load_gpt2("random", preset="gpt2-tiny").cfg == PRESETS["gpt2-tiny"]
    with pytest.raises(ValueError, match="unknown preset 'gpt2-huge'"):
        spamray.load_gpt2("random", preset="gpt2-huge")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        spamray.load_gpt2(str(tmp_path))


def test_context_length_is_enforced():
    model = spamray.load_gpt2("random", preset="gpt2-tiny")
    with pytest.raises(ValueError, match="exceed the context length 1024"):
        model(torch.zeros(1, 1025, dtype=torch.long))
