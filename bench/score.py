"""In-process scoring speed, GPT-2 small architecture (random weights), fp32, 1,000 SMS messages.

    python bench/score.py [--messages 1000] [--threads N] [--rounds 3]

Prints messages/second for spamray's scorer (the code the Ray replicas run), the book's
one-at-a-time loop, transformers fed the way pipeline(batch_size=32) feeds it, and the
machine's ceiling (fp32 GEMM rate / the model's forward FLOPs), all in this one process.

A shared machine's speed drifts by tens of percent from minute to minute, so the ceiling is
measured right before each spamray pass, in rounds, and the ratio is the median of the rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import first_messages, forward_flops, gemm_flops_per_second, rate, table  # noqa: E402

import spamray  # noqa: E402
from spamray import TextClassifier  # noqa: E402
from spamray.model import GPTModel, preset_config  # noqa: E402

LABELS = ["not spam", "spam"]


def book_loop(model: GPTModel, token_lists: list[list[int]], pad_to: int = 120) -> np.ndarray:
    """Chapter 6's classify_review: one message at a time, padded to 120, last position."""
    labels = []
    with torch.no_grad():
        for ids in token_lists:
            ids = ids[:pad_to] + [50256] * (pad_to - len(ids[:pad_to]))
            logits = model(torch.tensor(ids).unsqueeze(0))[:, -1, :]
            labels.append(int(logits.argmax(-1)))
    return np.array(labels)


def hf_pipeline_style(hf_model, token_lists: list[list[int]], batch_size: int = 32) -> np.ndarray:
    """GPT2ForSequenceClassification in input order, each batch padded to its longest."""
    labels = []
    with torch.inference_mode():
        for start in range(0, len(token_lists), batch_size):
            rows = token_lists[start:start + batch_size]
            width = max(map(len, rows))
            ids = torch.tensor([r + [50256] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            labels.extend(hf_model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist())
    return np.array(labels)


def make_hf_model(classifier: TextClassifier):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = classifier.cfg
    hf = GPT2ForSequenceClassification(GPT2Config(n_embd=cfg.emb_dim, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                                                  num_labels=len(LABELS), pad_token_id=50256,
                                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    return hf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--book-messages", type=int, default=200, help="the book loop is slow: time a subset")
    parser.add_argument("--rounds", type=int, default=3, help="ceiling-then-spamray rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    texts = first_messages(args.messages)
    classifier = TextClassifier.from_gpt2(GPTModel(preset_config("gpt2-small")), LABELS).eval()
    token_lists = [ids[:1024] for ids in spamray.get_tokenizer().encode_batch(texts)]
    n_tokens = [len(ids) for ids in token_lists]
    hf = make_hf_model(classifier)

    flops_per_message = forward_flops(classifier.cfg, n_tokens) / len(texts)
    classifier.predict(texts[:64])  # warm-up
    rounds = []
    for _ in range(args.rounds):
        ceiling = gemm_flops_per_second(classifier.cfg.emb_dim) / flops_per_message
        rounds.append((ceiling, rate(lambda: classifier.predict(texts), len(texts), warmup=lambda: None)))
    ceiling, spamray_rate = (float(np.median(column)) for column in zip(*rounds))
    results = [("fp32 ceiling (GEMM rate / FLOPs)", ceiling), ("spamray in-process", spamray_rate)]
    results.append(("transformers, pipeline-style", rate(lambda: hf_pipeline_style(hf, token_lists), len(texts),
                                                          warmup=lambda: hf_pipeline_style(hf, token_lists[:64]))))
    book = token_lists[:args.book_messages]
    results.append(("book loop (1 msg, pad 120)", rate(lambda: book_loop(classifier.gpt, book), len(book),
                                                        warmup=lambda: book_loop(classifier.gpt, book[:8]))))

    quantized = quantized_rate_and_agreement(classifier, texts, token_lists)
    if quantized:
        results.append(("spamray int8 dynamic (CPU)", quantized[0]))

    print(f"GPT-2 small (random weights), fp32, {len(texts)} SMS messages, {sum(n_tokens):,} tokens "
          f"(mean {np.mean(n_tokens):.1f}), {args.threads} threads, torch {torch.__version__}")
    print(table(results, baseline="book loop (1 msg, pad 120)"))
    print("rounds (ceiling, spamray): " + ", ".join(f"{c:.1f} {r:.1f} ({r / c:.0%})" for c, r in rounds))
    print(f"spamray / ceiling, median of {len(rounds)} rounds: {np.median([r / c for c, r in rounds]):.1%}")
    if quantized:
        print(f"int8 / fp32 ceiling: {quantized[0] / ceiling:.2f}x; labels equal to fp32's: {quantized[1]:.2%}")


def quantized_rate_and_agreement(classifier: TextClassifier, texts, token_lists):
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        return None
    import copy

    int8 = quantize_dynamic(copy.deepcopy(classifier), {torch.nn.Linear}, dtype=torch.qint8).eval()
    agreement = float((int8.score_token_ids(token_lists).argmax(1) == classifier.score_token_ids(token_lists).argmax(1)).mean())
    return rate(lambda: int8.predict(texts), len(texts), warmup=lambda: int8.predict(texts[:64])), agreement


if __name__ == "__main__":
    main()
