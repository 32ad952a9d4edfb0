"""GPU figures for GPT-2 small (random weights): bf16 scoring throughput and model FLOP
utilisation, and one training epoch of the book's configuration. Plain PyTorch, no Ray.

    python bench/gpu.py            (bench/gpu.sh runs it on a lent GPU machine)
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import forward_flops  # noqa: E402

import spamray  # noqa: E402
from spamray import TextClassifier  # noqa: E402
from spamray.model import GPTModel, preset_config  # noqa: E402
from spamray.prepare import balance, read_labelled, split  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def synchronized_seconds(function) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    function()
    sync()
    return time.perf_counter() - start


def measured_matmul_rate() -> float:
    a, b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16), torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = synchronized_seconds(lambda: [a @ b for _ in range(20)])
    return 20 * 2 * 8192**3 / seconds


def scoring(texts: list[str], peak: float) -> None:
    torch.manual_seed(0)
    classifier = TextClassifier.from_gpt2(GPTModel(preset_config("gpt2-small")), ["not spam", "spam"]).eval()
    token_lists = spamray.get_tokenizer().encode_batch(texts)
    flops = forward_flops(classifier.cfg, [len(t) for t in token_lists])
    fp32 = classifier.cuda().score_token_ids(token_lists[:2000])
    classifier.set_precision("bf16")  # as a bf16 scoring replica: final LayerNorm and head in fp32
    print(f"scoring {len(texts):,} messages, {sum(map(len, token_lists)):,} tokens")
    for tokens, rows in ((16384, 512), (65536, 2048), (262144, 8192)):
        run = lambda: classifier.score_token_ids(token_lists, max_batch_tokens=tokens, max_batch_rows=rows)  # noqa: E731
        run()
        seconds = min(synchronized_seconds(run) for _ in range(3))
        print(f"  bf16, batches of <= {tokens:>6} tokens / {rows:>4} rows: {len(texts) / seconds:>10,.0f} msgs/s, "
              f"MFU {flops / seconds / peak:.1%} of {peak / 1e12:.0f} TFLOP/s")
    # Model only: the same buckets padded and on the GPU beforehand, to separate host-side cost.
    from spamray.classifier import length_buckets, pad_rows

    batches = []
    for bucket in length_buckets([len(t) for t in token_lists], 65536, 2048):
        ids, lengths = pad_rows([token_lists[i] for i in bucket], classifier.max_length)
        batches.append((torch.from_numpy(ids).cuda(), torch.from_numpy(lengths).cuda()))
    for label, model in (("eager", classifier), ("torch.compile", torch.compile(classifier, dynamic=True))):
        def forward_all(model=model):
            with torch.inference_mode():
                for ids, lengths in batches:
                    model(ids, lengths)
        started = time.perf_counter()
        forward_all()
        warm = time.perf_counter() - started
        seconds = min(synchronized_seconds(forward_all) for _ in range(3))
        print(f"  bf16 model only ({label}, first pass {warm:.1f} s): {len(texts) / seconds:>10,.0f} msgs/s, "
              f"MFU {flops / seconds / peak:.1%}")
    bf16 = classifier.score_token_ids(token_lists[:2000])
    print(f"  bf16 labels equal to fp32's on 2,000 messages: {(bf16.argmax(1) == fp32.argmax(1)).mean():.2%}, "
          f"max |p| difference {np.abs(bf16 - fp32).max():.4f}")


def replica_scoring(texts: list[str], peak: float, preset: str = "gpt2-small") -> None:
    """What a scoring replica does with the pipeline's GPU defaults: Arrow batches of
    RAY_BATCH_ROWS["gpu"] rows in, probabilities and labels out, precision "auto" (bf16)."""
    import tempfile

    import pyarrow as pa

    from spamray.replica import Scorer, tokenize_batch
    from spamray.score import RAY_BATCH_ROWS

    torch.manual_seed(0)
    folder = tempfile.mkdtemp() + "/model"
    TextClassifier.from_gpt2(GPTModel(preset_config(preset)), ["not spam", "spam"]).save(folder)
    replica = Scorer(folder, threads=os.cpu_count(), model_name="bench", precision="auto")
    rows = RAY_BATCH_ROWS["gpu" if torch.cuda.is_available() else "cpu"]
    batches = [tokenize_batch(pa.table({"text": texts[start:start + rows], "status": pa.nulls(len(texts[start:start + rows]), pa.string())}),
                              replica.classifier.max_length, keep_text=False) for start in range(0, len(texts), rows)]
    flops = forward_flops(replica.classifier.cfg, [n for batch in batches for n in batch["n_tokens"].to_pylist()])
    replica(batches[0])  # warm-up
    seconds = min(synchronized_seconds(lambda: [replica(batch) for batch in batches]) for _ in range(3))
    dtype = next(replica.classifier.parameters()).dtype
    print(f"  scoring replica ({dtype}, Arrow batches of {rows:,} rows, tokenized beforehand): "
          f"{len(texts) / seconds:>10,.0f} msgs/s, MFU {flops / seconds / peak:.1%}")


def training_epoch() -> None:
    frame = read_labelled("sms")
    frame = frame.assign(label=(frame["label"] == "spam").astype("int64"))
    train = split(balance(frame, 123), 0.7, 0.1, 123)["train"]
    tok = spamray.get_tokenizer()
    torch.manual_seed(123)
    classifier = TextClassifier.from_gpt2(GPTModel(preset_config("gpt2-small")), ["not spam", "spam"],
                                          trainable="last_block").cuda().train()
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.1)
    rows = tok.encode_batch(train["text"].tolist())
    labels = torch.tensor(train["label"].to_numpy())

    def epoch():
        for start in range(0, len(rows) - 7, 8):  # batch 8, drop_last, as the book
            ids, lengths = tok.pad(rows[start:start + 8])
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = classifier(torch.from_numpy(ids).cuda(), torch.from_numpy(lengths).cuda())
            loss = torch.nn.functional.cross_entropy(logits.float(), labels[start:start + 8].cuda())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    epoch()  # warm-up epoch
    seconds = synchronized_seconds(epoch)
    print(f"training: one epoch of the book's configuration (1,045 messages, batch 8, last_block, bf16 autocast): "
          f"{seconds:.2f} s ({len(rows) // 8 * 8 / seconds:,.0f} examples/s)")


def main() -> None:
    name = torch.cuda.get_device_name()
    peak = next((value for key, value in PEAK_BF16.items() if key in name), 989e12)
    print(f"{name}, torch {torch.__version__}; measured bf16 8192^3 matmul: {measured_matmul_rate() / 1e12:.0f} TFLOP/s")
    texts = read_labelled("sms")["text"].tolist() * 8
    scoring(texts, peak)
    replica_scoring(texts, peak)
    training_epoch()


if __name__ == "__main__":
    main()
