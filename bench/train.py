"""Training speed: the book's configuration against spamray's defaults (same process, same data),
each in fp32 and in bf16 autocast (`train --precision bf16`), then 2 Ray Train workers against 1
on this machine.

    python bench/train.py [--steps 30] [--preset gpt2-small] [--ray-preset gpt2-mini]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table  # noqa: E402

import spamray  # noqa: E402
from spamray import TextClassifier  # noqa: E402
from spamray.config import PrepareConfig, TrainConfig  # noqa: E402
from spamray.model import GPTModel, preset_config  # noqa: E402
from spamray.prepare import prepare  # noqa: E402


def examples_per_second(texts, labels, preset: str, pooling: str, pad_to: int | None, steps: int,
                        precision: str = "fp32", trainable: str = "last_block") -> float:
    torch.manual_seed(123)
    clf = TextClassifier.from_gpt2(GPTModel(preset_config(preset)), ["not spam", "spam"], pooling=pooling,
                                   trainable=trainable).train()
    optimizer = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.1)
    tok = spamray.get_tokenizer()
    rows = tok.encode_batch(texts)

    def step(start):
        ids, lengths = tok.pad(rows[start:start + 8], length=pad_to)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # as train_loop_per_worker
            loss = torch.nn.functional.cross_entropy(clf(torch.from_numpy(ids), torch.from_numpy(lengths)),
                                                     torch.tensor(labels[start:start + 8]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(0)  # warm-up
    started = time.perf_counter()
    for index in range(steps):
        step((index * 8) % (len(rows) - 8))
    return steps * 8 / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--ray-preset", default="gpt2-mini")
    parser.add_argument("--no-ray", action="store_true", help="only the in-process rows")
    args = parser.parse_args()
    import pandas as pd

    work = tempfile.mkdtemp(prefix="spamray-bench-train-")
    prepare(PrepareConfig(output=f"{work}/data"))
    train_split = pd.read_parquet(f"{work}/data/train.parquet")
    texts, labels = train_split["text"].tolist(), train_split["label"].tolist()

    rows = [("book: last position, padded to 120", examples_per_second(texts, labels, args.preset, "last", 120, args.steps)),
            ("spamray: last_token, per-batch padding", examples_per_second(texts, labels, args.preset, "last_token", None, args.steps)),
            ("spamray, bf16 autocast", examples_per_second(texts, labels, args.preset, "last_token", None, args.steps, "bf16"))]
    print(f"{args.preset}, last_block trainable, batch 8, {args.steps} steps, {torch.get_num_threads()} threads")
    print(table(rows, baseline="book: last position, padded to 120", unit="examples/s"))
    demo_rows = [(f"spamray {precision}", examples_per_second(texts, labels, args.ray_preset, "last_token", None,
                                                             args.steps * 4, precision, trainable="all"))
                 for precision in ("fp32", "bf16")]
    print(f"\n{args.ray_preset}, every layer trainable (the demo's), batch 8, {args.steps * 4} steps")
    print(table(demo_rows, baseline="spamray fp32", unit="examples/s"))
    if args.no_ray:
        return

    import ray

    from spamray.train import train

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_rows = []
    for workers in (1, 2):
        cfg = TrainConfig(data=f"{work}/data", output=f"{work}/model-{workers}", weights="random", preset=args.ray_preset,
                          trainable="all", learning_rate=5e-4, epochs=1, num_workers=workers,
                          cpus_per_worker=max(1, os.cpu_count() // workers), storage_path=f"{work}/runs")
        metrics = train(cfg)
        ray_rows.append((f"Ray Train, {workers} worker(s) x {cfg.cpus_per_worker} CPU", metrics["training"]["examples_per_second"]))
    print(f"\n{args.ray_preset} from random weights, all trainable, 1 epoch (evaluation included), {os.cpu_count()} CPUs")
    print(table(ray_rows, baseline=ray_rows[0][0], unit="examples/s"))


if __name__ == "__main__":
    main()
