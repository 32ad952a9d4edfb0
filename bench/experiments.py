"""The chapter's exercises and the book's additional experiments, trained side by side.

Each row is `spamray train` with one setting changed, on the same prepared SMS data from the
same starting weights (one seed), on local Ray; the table gives train, validation and test
accuracy (most probable label, the book's measure) beside the book's figure for that row where
the book's repository reports one (GPT-2 small, pretrained, last block trained). Offline, rows
start from random `gpt2-mini` weights with every layer trained, so the figures differ from the
book's: what carries over is the ordering between rows.

    python bench/experiments.py [--rows book exercise_6_1 ...] [--epochs 3] [--context-tokens 256]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spamray.ray_runtime import setup_logging, start_ray  # noqa: E402
from spamray.config import PrepareConfig, TrainConfig  # noqa: E402
from spamray.prepare import prepare  # noqa: E402
from spamray.train import train  # noqa: E402

# name: (what it is, the settings it changes, the book's test accuracy for it or None)
ROWS = {
    "book": ("the book: last position, padded to the longest training message",
             {"pooling": "last", "padding": "longest"}, 0.9500),
    "exercise_6_1": ("exercise 6.1: last position, padded to the context", {"pooling": "last", "padding": "context"},
                     0.7833),
    "exercise_6_3": ("exercise 6.3: first token", {"pooling": "first", "padding": "longest"}, 0.7500),
    "accumulation": ("no padding: batch 1, gradients of 8 accumulated", {"batch_size": 1, "grad_accumulation": 8},
                     None),
    "no_causal_mask": ("causal mask disabled (padding never attended)", {"causal_mask": False}, None),
    "mean_pooling": ("mean of the non-padding tokens", {"pooling": "mean"}, None),
    "spamray_default": ("spamray's default: last real token, each batch padded to its longest", {}, None),
}
DEFAULT_ROWS = ["book", "exercise_6_1", "exercise_6_3", "accumulation", "no_causal_mask", "mean_pooling"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--preset", default="gpt2-mini")
    parser.add_argument("--context-tokens", type=int, default=256,
                        help="the context that exercise 6.1 pads to (--max-length; the model's is 1,024): a 2-core "
                             "CPU trains 1,024-token batches for hours")
    args = parser.parse_args()
    setup_logging(verbose=False)
    logging.getLogger("spamray").setLevel(logging.WARNING)  # the table is the output
    start_ray()
    work = tempfile.mkdtemp(prefix="spamray-experiments-")
    data = f"{work}/data"
    prepare(PrepareConfig(output=data))
    base = TrainConfig(data=data, output="", weights="random", preset=args.preset, trainable="all",
                       learning_rate=5e-4, epochs=args.epochs, num_workers=1, cpus_per_worker=2,
                       storage_path=f"{work}/runs", target_fpr=None)
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; {args.preset} from random weights "
          f"(seed {base.seed}), every layer trained, AdamW lr {base.learning_rate}, {args.epochs} epochs, batch 8")
    results = []
    for name in args.rows:
        what, settings, book = ROWS[name]
        if settings.get("padding") == "context":
            settings = {**settings, "max_length": args.context_tokens}
            what += f" ({args.context_tokens} tokens here, 1,024 in the book)"
        started = time.time()
        metrics = train(replace(base, output=f"{work}/{name}", **settings))
        results.append((what, metrics, book, (time.time() - started) / 60))
        print(f"  {name}: test {metrics['test_argmax_accuracy']:.2%} in {results[-1][3]:.1f} min", flush=True)
    print()
    print(format_table(results))


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "CPU")


def format_table(results: list) -> str:
    header = "| setting | train | validation | test | the book's test (GPT-2 small) | minutes |"
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for what, metrics, book, minutes in results:
        figures = [metrics[f"{split}_argmax_accuracy"] for split in ("train", "validation", "test")]
        lines.append(f"| {what} | " + " | ".join(f"{value:.2%}" for value in figures)
                     + f" | {f'{book:.2%}' if book is not None else '—'} | {minutes:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
