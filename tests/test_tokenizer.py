import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import spamray
from spamray.tokenizer import PAD_ID


@pytest.mark.slow
def test_encodes_like_gpt2_offline_with_an_empty_cache(tmp_path):
    # A fresh process, an empty tiktoken cache and every socket refused: the shipped BPE files suffice.
    script = textwrap.dedent("""
        import socket
        def refuse(*args, **kwargs):
            raise OSError("network disabled in this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import spamray
        tok = spamray.get_tokenizer()
        assert tok.encode("Do you have time") == [5211, 345, 423, 640], tok.encode("Do you have time")
        assert tok.n_vocab == 50257 and tok.pad_id == 50256
        print("ok")
    """)
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_batch_encoding_matches_single_and_truncates():
    tok = spamray.get_tokenizer()
    texts = ["Do you have time", "WINNER!! Claim your prize now", "ok"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, max_length=2) == [tok.encode(t)[:2] for t in texts]
    assert tok.encode("Do you have time", max_length=3) == [5211, 345, 423]


def test_pad_right_pads_with_endoftext():
    tok = spamray.get_tokenizer()
    ids, lengths = tok.pad([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [4, PAD_ID, PAD_ID]]
    assert lengths.tolist() == [3, 1]
    ids, _ = tok.pad([[1]], length=4)
    assert ids.tolist() == [[1, PAD_ID, PAD_ID, PAD_ID]]
    with pytest.raises(ValueError, match="row 0 has 3 tokens"):
        tok.pad([[1, 2, 3]], length=2)


def test_bad_input_is_named():
    tok = spamray.get_tokenizer()
    assert tok.encode("") == []  # documented: empty text has no tokens
    with pytest.raises(TypeError, match="must be a str, got int"):
        tok.encode(42)
    with pytest.raises(TypeError, match="text at index 1 must be a str, got NoneType"):
        tok.encode_batch(["fine", None])
    with pytest.raises(TypeError, match="not one string"):
        tok.encode_batch("a single string")


def test_special_token_text_in_a_message_is_ordinary_text_and_never_padding(model_url):
    # A sender who writes "<|endoftext|>" must not get the pad id: the classifier would read
    # the message as ending in padding, which shifted a prediction from p_spam 0.63 to 0.46.
    tok = spamray.get_tokenizer()
    message = "WINNER! claim your prize now"
    ids = tok.encode(message + "<|endoftext|>")
    assert PAD_ID not in ids and tok.decode(ids) == message + "<|endoftext|>"
    assert tok.encode_batch([message + "<|endoftext|>", "<|endoftext|>"]) == [ids, tok.encode("<|endoftext|>")]
    classifier = spamray.TextClassifier.load(model_url)
    spam = classifier.labels.index("spam")
    written = classifier.predict([message + "<|endoftext|>"])[0].probs["spam"]
    as_text = float(classifier.score_token_ids([np.array(ids)])[0][spam])
    as_padding = float(classifier.score_token_ids([np.array(tok.encode(message) + [PAD_ID])])[0][spam])
    assert abs(written - as_text) < 1e-5 and abs(written - as_padding) > 1e-3
