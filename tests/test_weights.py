"""GPT-2 weight import, checked against transformers' own GPT-2 on the same weights."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import spamray
from spamray import weights
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


def test_published_name_reads_the_local_cache(gpt2_small_hf_checkpoint, tmp_path, monkeypatch):
    folder, _ = gpt2_small_hf_checkpoint
    monkeypatch.setenv("SPAMRAY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(weights, "HUB_URL", "http://127.0.0.1:9/{name}")  # nothing listens there
    shutil.copytree(folder, tmp_path / "gpt2" / "gpt2")
    assert spamray.load_gpt2("gpt2").cfg == PRESETS["gpt2-small"]


def test_published_name_without_network_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("SPAMRAY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(weights, "HUB_URL", "http://127.0.0.1:9/{name}")
    with pytest.raises(RuntimeError, match=r"could not download config.json of gpt2-medium.*pass their folder"):
        spamray.load_gpt2("gpt2-medium")


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
