"""The classification head, pooling, trainable policies, and the saved-classifier folder."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import spamray
from spamray import TextClassifier
from spamray.model import GPTModel, count_parameters, preset_config
from spamray.saved import SavedClassifierError

LABELS = ["not spam", "spam"]


def tiny_classifier(pooling="last_token", seed=0, **kwargs):
    torch.manual_seed(seed)
    return TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), LABELS, pooling=pooling, **kwargs).eval()


def logits_of(clf, rows, width):
    ids, lengths = spamray.get_tokenizer().pad(rows, length=width)
    with torch.no_grad():
        return clf(torch.from_numpy(ids), torch.from_numpy(lengths))


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_prediction_does_not_depend_on_padding_or_batch(pooling, sms_messages):
    clf = tiny_classifier(pooling)
    tok = spamray.get_tokenizer()
    message = tok.encode(sms_messages[2])
    others = [tok.encode(m) for m in sms_messages[3:8]]
    alone = logits_of(clf, [message], len(message))[0]
    for pad in (0, 7, 300):
        width = max(len(message), *map(len, others)) + pad
        for batch in ([message], [message, *others], [*others, message]):
            got = logits_of(clf, batch, width)[batch.index(message)]
            assert (got - alone).abs().max().item() <= 1e-5


def test_last_pooling_reads_the_final_position_like_the_book(sms_messages):
    clf = tiny_classifier("last")
    tok = spamray.get_tokenizer()
    message = tok.encode(sms_messages[2])
    padded, _ = tok.pad([message], length=len(message) + 5)
    with torch.no_grad():
        expected = clf.gpt.out_head(clf.gpt.hidden_states(torch.from_numpy(padded))[:, -1])
        got = logits_of(clf, [message], len(message) + 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_last_block_shortcut_equals_the_full_forward(sms_messages):
    clf = tiny_classifier()
    rows = [spamray.get_tokenizer().encode(m) for m in sms_messages[:5]]
    ids, lengths = spamray.get_tokenizer().pad(rows)
    ids, lengths = torch.from_numpy(ids), torch.from_numpy(lengths)
    with torch.no_grad():
        full = clf.gpt.hidden_states(ids)[torch.arange(5), lengths - 1]
        shortcut = clf.gpt.hidden_states(ids, query_positions=lengths - 1)[:, 0]
    torch.testing.assert_close(shortcut, full, rtol=0, atol=1e-5)


# GPT-2 small: a block is 7,087,872 parameters, the final LayerNorm 1,536, a 2-class head 1,538.
BLOCK, FINAL_NORM, HEAD = 7_087_872, 1_536, 768 * 2 + 2


@pytest.mark.parametrize("policy, expected", [
    ("head", HEAD),
    ("last_block", BLOCK + FINAL_NORM + HEAD),
    ("last_n_blocks:3", 3 * BLOCK + FINAL_NORM + HEAD),
    ("all", 124_439_808 + HEAD),  # the tied LM head is gone; embeddings, blocks, norm, new head
    # LoRA rank 8 on the 4 linear layers of each of 12 blocks: 8 x (in + out) each.
    ("lora:8", 12 * 8 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768)) + HEAD),
])
def test_trainable_policies_on_gpt2_small(policy, expected):
    with torch.device("meta"):
        clf = TextClassifier.from_gpt2(GPTModel(preset_config("gpt2-small")), LABELS, trainable=policy)
    assert count_parameters(clf, trainable_only=True) == expected
    if policy == "last_block":
        trainable = {name.split(".")[1] for name, p in clf.named_parameters() if p.requires_grad}
        assert trainable == {"trf_blocks", "final_norm", "out_head"}
        assert all(p.requires_grad == name.startswith("gpt.trf_blocks.11.") for name, p in clf.gpt.trf_blocks.named_parameters(prefix="gpt.trf_blocks"))


@pytest.mark.parametrize("policy", ["everything", "last_n_blocks:0", "last_n_blocks:3", "lora:0", "lora:x"])
def test_unknown_trainable_policy(policy):
    model = spamray.load_gpt2("random", "gpt2-tiny")  # 2 blocks: last_n_blocks:3 is too many
    with pytest.raises(ValueError, match="unknown trainable policy"):
        TextClassifier.from_gpt2(model, LABELS, trainable=policy)


def test_round_trip_gives_identical_logits(tmp_path, sms_messages):
    clf = tiny_classifier(max_length=64)
    clf.metrics = {"test_accuracy": 0.5}
    clf.save(str(tmp_path / "model"))
    loaded = TextClassifier.load(f"file://{tmp_path / 'model'}")
    assert (loaded.labels, loaded.pooling, loaded.max_length, loaded.metrics) == (LABELS, "last_token", 64, {"test_accuracy": 0.5})
    rows = [spamray.get_tokenizer().encode(m, max_length=64) for m in sms_messages[:20]]
    assert np.array_equal(loaded.score_token_ids(rows), clf.score_token_ids(rows))
    assert loaded.fingerprint() == clf.fingerprint()


def test_lora_is_merged_before_saving(tmp_path, sms_messages):
    clf = tiny_classifier(trainable="lora:4")
    with torch.no_grad():
        for name, p in clf.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.1)
    before = clf.score_token_ids([spamray.get_tokenizer().encode(sms_messages[0])])
    clf.save(str(tmp_path / "model"))
    loaded = TextClassifier.load(str(tmp_path / "model"))
    after = loaded.score_token_ids([spamray.get_tokenizer().encode(sms_messages[0])])
    np.testing.assert_allclose(after, before, atol=1e-5)
    assert not any("lora" in name for name in load_file(tmp_path / "model" / "model.safetensors"))


def test_saving_onto_an_existing_classifier_needs_overwrite(tmp_path):
    clf = tiny_classifier()
    clf.save(str(tmp_path / "model"))
    with pytest.raises(FileExistsError, match="already exists"):
        clf.save(str(tmp_path / "model"))
    clf.save(str(tmp_path / "model"), overwrite=True)
    assert TextClassifier.load(str(tmp_path / "model")).labels == LABELS


@pytest.fixture
def saved_folder(tmp_path):
    folder = tmp_path / "model"
    tiny_classifier().save(str(folder))
    return folder


def rewrite_weights(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def edit_json(folder, change):
    path = folder / "spamray.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("breakage, message", [
    (lambda f: (f / "spamray.json").unlink(), "has no spamray.json"),
    (lambda f: (f / "model.safetensors").unlink(), "incomplete: model.safetensors is missing"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 20), "not a readable safetensors file"),
    (lambda f: rewrite_weights(f, lambda t: t.pop("gpt.out_head.bias")), "missing tensor 'gpt.out_head.bias'"),
    (lambda f: rewrite_weights(f, lambda t: t.update({"gpt.out_head.bias": torch.zeros(3)})), r"'gpt.out_head.bias' has shape \(3,\), expected \(2,\)"),
    (lambda f: rewrite_weights(f, lambda t: t.update({"gpt.out_head.bias": torch.zeros(2, dtype=torch.float16)})), "dtype torch.float16, expected torch.float32"),
    (lambda f: rewrite_weights(f, lambda t: t.update({"extra": torch.zeros(1)})), "tensors the model does not have: \\['extra'\\]"),
    (lambda f: rewrite_weights(f, lambda t: t["gpt.out_head.bias"].add_(1)), "does not match the sha256"),
    (lambda f: edit_json(f, lambda r: r.update(format_version=99)), "format version 99"),
    (lambda f: edit_json(f, lambda r: r.update(format="something-else")), "not a spamray classifier"),
    (lambda f: edit_json(f, lambda r: r["model_config"].update(emb_dim=128, n_heads=2)), "has shape"),
    (lambda f: edit_json(f, lambda r: r.update(pooling="max")), "unknown pooling 'max'"),
    (lambda f: edit_json(f, lambda r: r["tokenizer"]["sha256"].update({"vocab.bpe": "0" * 64})), "another tokenizer"),
    # joined to the folder unchecked, this once read /etc/passwd
    (lambda f: edit_json(f, lambda r: r["weights"].update(file="../../../../../../etc/passwd")),
     r"weights.file is '../../../../../../etc/passwd'; a spamray classifier keeps its weights in 'model.safetensors'"),
    (lambda f: edit_json(f, lambda r: r["weights"].update(file="/etc/passwd")), "weights.file is '/etc/passwd'"),
])
def test_broken_folders_say_what_is_wrong(saved_folder, breakage, message):
    breakage(saved_folder)
    with pytest.raises(SavedClassifierError, match=message):
        TextClassifier.load(str(saved_folder))


def test_not_a_classifier_folder(tmp_path):
    with pytest.raises(SavedClassifierError, match="does not exist"):
        TextClassifier.load(str(tmp_path / "nowhere"))


def test_predict_results_and_bad_input(sms_messages):
    clf = tiny_classifier(max_length=32)
    predictions = clf.predict(["Free entry in 2 a wkly comp to win FA Cup final tkts", "see you soon"])
    assert [set(p.probs) for p in predictions] == [set(LABELS)] * 2
    for p in predictions:
        assert p.label == LABELS[p.label_id] == max(p.probs, key=p.probs.get)
        assert abs(sum(p.probs.values()) - 1) < 1e-6
    # Too long for max_length: truncated to the first 32 tokens, not an error.
    long_text = " ".join(sms_messages[:100])
    head = spamray.get_tokenizer().decode(spamray.get_tokenizer().encode(long_text)[:32])
    assert clf.predict([long_text])[0].probs == pytest.approx(clf.predict([head])[0].probs, abs=1e-6)
    with pytest.raises(ValueError, match="text at index 1 is empty"):
        clf.predict(["fine", ""])
    with pytest.raises(TypeError, match="text at index 0 must be a str"):
        clf.predict([3.5])
    with pytest.raises(ValueError, match="unknown pooling"):
        tiny_classifier("max")
    with pytest.raises(ValueError, match="at least two distinct labels"):
        TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["spam"])
    with pytest.raises(ValueError, match="max_length 2048"):
        tiny_classifier(max_length=2048)
