"""A night of scoring, by stage: `spamray score` on 8 copies of the shipped messages (44,592 rows,
one Parquet file a copy) with the demo's trained classifier, at fp32 and at each other precision
asked for, in turns, on one local Ray (its start-up is not counted).

    python bench/night.py [--copies 8] [--rounds 2] [--precisions fp32 auto] [--cache runs/bench] [--model DIR]

Per run: rows/s end to end and its ratio to fp32's in the same round, then Ray Data's own stats of
each stage (the summed wall time of its tasks) and the replica's busy share (its scoring function's
time over the run's). Last, the stages alone in this process on the same rows (read, tokenize,
score at each precision): what the pipeline would take if nothing waited on anything.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from score import demo_classifier  # noqa: E402  (bench/score.py: the demo's classifier, made once)

import spamray.score  # noqa: E402
from spamray.config import ScoreConfig  # noqa: E402
from spamray.inputs import read_chunks  # noqa: E402
from spamray.prepare import read_labelled  # noqa: E402
from spamray.replica import Scorer, replica_cpu_reservation, replica_threads, tokenize_batch  # noqa: E402
from spamray.score import score  # noqa: E402


def write_night(folder: Path, copies: int) -> list[str]:
    messages = read_labelled("sms")[["text"]]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for copy in range(copies):
        path = folder / f"day-{copy:02d}.parquet"
        pq.write_table(pa.Table.from_pandas(messages, preserve_index=False), path)
        paths.append(str(path))
    return paths


class StatsOfTheRun:
    """Ray Data's stats of the dataset a scoring run writes (kept from spamray.score's writer)."""

    def __init__(self):
        self.text = ""
        self._write = spamray.score.write_with_progress

    def __enter__(self):
        def keeping_stats(dataset, *args):
            try:
                self._write(dataset, *args)
            finally:
                self.text = dataset.stats()
        spamray.score.write_with_progress = keeping_stats
        return self

    def __exit__(self, *exc):
        spamray.score.write_with_progress = self._write

    def stage_seconds(self) -> dict[str, float]:
        """Summed remote wall time of each operator's tasks."""
        seconds, operator = {}, None
        for line in self.text.splitlines():
            named = re.match(r"Operator \d+ (.+?):", line.strip())
            if named:
                operator = named.group(1)
            total = re.search(r"Remote wall time: .*?([\d.]+)(us|ms|s) total", line)
            if operator and total:
                value = float(total.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[total.group(2)]
                seconds[operator] = seconds.get(operator, 0.0) + value
        return seconds


def stages_alone(files: list[str], model: str, precisions: list[str], threads: int) -> dict[str, float]:
    """Seconds of each stage over every row, in this process, one after another."""
    started = time.perf_counter()
    chunks = [chunk for path in files for chunk in read_chunks(path, "text", {}, 65536)]
    seconds = {"read": time.perf_counter() - started}
    started = time.perf_counter()
    batches = [tokenize_batch(chunk, max_length=1024, keep_text=False) for chunk in chunks]
    seconds["tokenize"] = time.perf_counter() - started
    rows = pa.concat_tables(batches)
    for precision in precisions:
        scorer = Scorer(model, threads=threads, model_name=model, precision=precision)
        started = time.perf_counter()
        for start in range(0, rows.num_rows, 1024):
            scorer.score_batch(rows.slice(start, 1024))
        seconds[f"score ({scorer.classifier.precision})"] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--cache", default="runs/bench")
    parser.add_argument("--cpus-per-replica", type=int, default=os.cpu_count())
    parser.add_argument("--model", help="a saved classifier folder (default: the demo's, made into --cache)")
    args = parser.parse_args()
    import ray

    model = args.model or demo_classifier(Path(args.cache).resolve())[0]
    work = Path(tempfile.mkdtemp(prefix="spamray-bench-night-"))
    files = write_night(work / "archive", args.copies)
    rows = pq.read_metadata(files[0]).num_rows * len(files)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rates = {precision: [] for precision in args.precisions}
    for round_ in range(args.rounds):
        for precision in args.precisions:
            with StatsOfTheRun() as stats:
                started = time.perf_counter()
                summary = score(ScoreConfig(model=model, input=str(work / "archive"),
                                            output=str(work / f"scores-{precision}-{round_}"), precision=precision,
                                            cpus_per_replica=args.cpus_per_replica))
                wall = time.perf_counter() - started
            assert summary.rows_written == rows, summary
            rates[precision].append(rows / wall)
            stages = stats.stage_seconds()
            scoring = next((s for name, s in stages.items() if "Scorer" in name), 0.0)
            print(f"round {round_ + 1}, --precision {precision} ({summary.precision}): {rows:,} rows in {wall:.1f} s, "
                  f"{rows / wall:,.0f} rows/s; stages (summed task wall time): "
                  + ", ".join(f"{name} {s:.1f} s" for name, s in stages.items())
                  + f"; replica busy {scoring / wall:.0%} of the run", flush=True)
    base = args.precisions[0]
    for precision in args.precisions[1:]:
        ratios = [a / b for a, b in zip(rates[precision], rates[base])]
        print(f"{precision} / {base} end to end, median of {len(ratios)} rounds: {statistics.median(ratios):.2f}x "
              f"({', '.join(f'{r:.2f}' for r in ratios)})")
    threads = replica_threads(replica_cpu_reservation(1, args.cpus_per_replica, os.cpu_count()))
    alone = stages_alone(files, model, args.precisions, threads)
    print(f"the stages alone in this process, scoring on the replica's {threads} thread(s): "
          + ", ".join(f"{name} {s:.1f} s ({rows / s:,.0f} rows/s)" for name, s in alone.items()))
    for precision, (name, seconds) in zip(args.precisions, [item for item in alone.items() if item[0].startswith("score")]):
        end_to_end = statistics.median(rates[precision])
        print(f"--precision {precision}: end to end {end_to_end:,.0f} rows/s, {end_to_end / (rows / seconds):.0%} of "
              f"{name} alone in this process ({rows / seconds:,.0f} rows/s)")

if __name__ == "__main__":
    main()
