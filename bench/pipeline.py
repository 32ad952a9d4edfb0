"""The Ray Data pipeline: its rate against the in-process scorer on the same rows and cores
(GPT-2 small), and the whole local cluster's peak memory for generated archives of growing size
(smallest preset, so the run measures the pipeline, not the model).

    python bench/pipeline.py [--rows 2000] [--rounds 2] [--archives 100000 1000000]

The machine's speed drifts between minutes, so the rate comparison runs in rounds (in-process,
then through Ray Data) and reports the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import first_messages, rate  # noqa: E402

from spamray import TextClassifier  # noqa: E402
from spamray.config import ScoreConfig  # noqa: E402
from spamray.model import GPTModel, preset_config  # noqa: E402
from spamray.prepare import read_labelled  # noqa: E402
from spamray.score import score  # noqa: E402


class PeakMemory:
    """Peak of the summed PSS of this process and every process it started (the local Ray
    cluster: GCS, raylet, object store, workers), sampled every 0.2 s."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def save_model(folder: str, preset: str) -> str:
    torch.manual_seed(0)
    TextClassifier.from_gpt2(GPTModel(preset_config(preset)), ["not spam", "spam"]).save(folder)
    return folder


def write_archive(folder: str, rows: int, per_file: int = 100_000) -> None:
    messages = np.array(read_labelled("sms")["text"].tolist(), dtype=object)
    generator = np.random.default_rng(0)
    os.makedirs(folder)
    for index, start in enumerate(range(0, rows, per_file)):
        count = min(per_file, rows - start)
        pq.write_table(pa.table({"message_id": np.arange(start, start + count),
                                 "text": messages[generator.integers(0, len(messages), count)]}),
                       f"{folder}/part-{index:04d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--archives", type=int, nargs="*", default=[100_000, 1_000_000])
    args = parser.parse_args()
    import ray

    work = tempfile.mkdtemp(prefix="spamray-bench-pipeline-")
    cpus = os.cpu_count()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)

    small = save_model(f"{work}/gpt2-small", "gpt2-small")
    texts = first_messages(args.rows)
    os.makedirs(f"{work}/rows")
    pq.write_table(pa.table({"text": texts}), f"{work}/rows/rows.parquet")
    classifier = TextClassifier.load(small)
    torch.set_num_threads(cpus)
    classifier.predict(texts[:64])  # warm-up
    rounds = []
    for index in range(args.rounds):
        in_process = rate(lambda: classifier.predict(texts), len(texts), warmup=lambda: None)
        started = time.perf_counter()
        score(ScoreConfig(model=small, input=f"{work}/rows", output=f"{work}/scores-small-{index}",
                          cpus_per_replica=cpus, precision="fp32"))  # the in-process side's precision
        rounds.append((in_process, len(texts) / (time.perf_counter() - started)))
    print(f"GPT-2 small, {len(texts):,} rows, {cpus} CPUs, rounds of in-process then Ray Data end to end "
          "(replica start-up included): " + ", ".join(f"{a:.1f} then {b:.1f} msgs/s ({b / a:.1%})" for a, b in rounds))
    print(f"Ray Data / in-process, median of {len(rounds)} rounds: {np.median([b / a for a, b in rounds]):.1%}")

    tiny = save_model(f"{work}/gpt2-tiny", "gpt2-tiny")
    peaks = []
    for rows in args.archives:
        write_archive(f"{work}/archive-{rows}", rows)
        with PeakMemory() as memory:
            summary = score(ScoreConfig(model=tiny, input=f"{work}/archive-{rows}", output=f"{work}/scores-{rows}",
                                        id_column="message_id", cpus_per_replica=cpus))
        peaks.append(memory.peak)
        print(f"gpt2-tiny, {rows:>9,} messages: {summary['rows_written']:,} rows written, "
              f"{summary['rows_per_second']:,.0f} rows/s, peak cluster memory {memory.peak / 2**30:.2f} GiB")
    if len(peaks) > 1:
        print(f"peak memory, largest / smallest archive: {peaks[-1] / peaks[0]:.2f}x")


if __name__ == "__main__":
    main()
