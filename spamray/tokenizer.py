"""GPT-2's byte-pair encoding through tiktoken, built from the BPE files shipped in the package.

`tiktoken.get_encoding("gpt2")` downloads these files on first use; building the encoding from
the shipped copies works with no network, and tiktoken checks both files' sha256.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources

import numpy as np
import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str

ENDOFTEXT = "<|endoftext|>"
PAD_ID = 50256
BPE_HASHES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
TOKENIZER_NAME = "gpt2"


def tokenizer_identity() -> dict:
    """What a saved classifier records so that it is only used with the same encoding."""
    return {"name": TOKENIZER_NAME, "sha256": dict(BPE_HASHES)}


class GPT2Tokenizer:
    """Encodes text to GPT-2 token ids, pads with `<|endoftext|>` (50256).

    Messages are untrusted text: special-token text inside one (a sender can write
    "<|endoftext|>") is encoded as the ordinary characters it is, never as 50256, which would
    let a message pass for padding and shift its own prediction. Only padding uses 50256."""

    pad_id = PAD_ID

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.n_vocab = encoding.n_vocab

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of one text, special-token text included as ordinary text (see the class).

        With `max_length`, the ids are cut to the first `max_length` tokens.
        """
        _check_text(text, where="text")
        ids = self.encoding.encode_ordinary(text)
        return ids if max_length is None else ids[:max_length]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids of many texts, each cut to `max_length`.

        One text after another: tiktoken's own `encode_ordinary_batch` starts a thread pool on
        every call, and on 2 cores that made it 6-11x slower than this loop at every batch size
        from 1 to 4,096 SMS (16 texts: 2.2 ms against 0.19 ms, the whole cost of a small request)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of texts, not one string; use encode()")
        for index, text in enumerate(texts):
            _check_text(text, where=f"text at index {index}")
        encode = self.encoding.encode_ordinary
        return [encode(text) if max_length is None else encode(text)[:max_length] for text in texts]

    def pad(self, batch: Sequence[Sequence[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Right-pads token id lists with 50256 to `length` (default: the longest in the batch).

        Returns (ids int64 [B, length], lengths int64 [B]); a row longer than `length` is an error,
        since silently cutting it here would hide a truncation the caller did not ask for.
        """
        lengths = np.fromiter((len(ids) for ids in batch), dtype=np.int64, count=len(batch))
        width = int(lengths.max(initial=0)) if length is None else length
        if lengths.size and lengths.max() > width:
            row = int(lengths.argmax())
            raise ValueError(f"row {row} has {lengths[row]} tokens, more than the pad length {width}; truncate first")
        padded = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        for row, ids in enumerate(batch):
            padded[row, : len(ids)] = ids
        return padded, lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))


def _check_text(text: object, where: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, got {type(text).__name__}: {text!r:.60}")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> GPT2Tokenizer:
    """The GPT-2 tokenizer, built once per process from the shipped BPE files."""
    folder = resources.files("spamray") / "data" / "gpt2"
    with resources.as_file(folder / "vocab.bpe") as vocab_bpe, resources.as_file(folder / "encoder.json") as encoder_json:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe),
            encoder_json_file=str(encoder_json),
            vocab_bpe_hash=BPE_HASHES["vocab.bpe"],
            encoder_json_hash=BPE_HASHES["encoder.json"],
        )
    encoding = tiktoken.Encoding(
        name=TOKENIZER_NAME,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: PAD_ID},
        explicit_n_vocab=50257,
    )
    return GPT2Tokenizer(encoding)
