"""How many cores a scoring replica keeps busy inside a night, and how the night's wall time splits.

    python bench/replica_cpu.py [--copies 4] [--precisions fp32 onnx-int8] [--cache runs/bench]

One `spamray score` per path on the demo's classifier over --copies copies of the shipped
messages, on one local Ray. While it runs, the replica's process is sampled every 0.5 s from
/proc (user + system time of each of its threads): the cores it used while it scored, and how many
of its threads did the work. Then the night's phases from its own log: before the replica scored
its first row (planning, starting the replica, loading the model), scoring, and after the last
row (commit, vacuum).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from night import write_night  # noqa: E402
from score import demo_classifier  # noqa: E402

from spamray.config import ScoreConfig  # noqa: E402
from spamray.score import score  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def thread_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    return seconds


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICKS


def process_seconds() -> dict[str, float]:
    """CPU seconds of every process, by its title (Ray titles its workers ray::NAME)."""
    seconds = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rpartition(")")[2].split()
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")[:60] or proc.name
        except OSError:
            continue
        seconds[f"{title} [{proc.name}]"] = (int(fields[11]) + int(fields[12])) / TICKS
    return seconds


def replica_pid() -> int | None:
    """The process of the scoring replica (Ray titles an actor's process with its class)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"MapBatches(Scorer)" in (proc / "cmdline").read_bytes():
                return int(proc.name)
        except OSError:
            continue
    return None


def sample(stop: threading.Event, samples: list) -> None:
    pid = None
    while not stop.wait(0.5):
        pid = pid or replica_pid()
        if pid:
            try:
                samples.append((time.perf_counter(), thread_seconds(pid), machine_busy_seconds(), process_seconds()))
            except FileNotFoundError:
                return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "onnx-int8"])
    parser.add_argument("--cache", default="runs/bench")
    parser.add_argument("--cpus-per-replica", type=int, default=2)
    args = parser.parse_args()
    import ray

    model, _ = demo_classifier(Path(args.cache).resolve())
    work = Path(tempfile.mkdtemp(prefix="spamray-bench-replica-"))
    write_night(work / "archive", args.copies)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    for precision in args.precisions:
        samples, stop = [], threading.Event()
        sampler = threading.Thread(target=sample, args=(stop, samples), daemon=True)
        sampler.start()
        started = time.perf_counter()
        summary = score(ScoreConfig(model=model, input=str(work / "archive"), output=str(work / f"scores-{precision}"),
                                    precision=precision, cpus_per_replica=args.cpus_per_replica))
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
        busy = [(t, s) for t, s, _, _ in samples]
        # the scoring span: from the first sample where the replica's CPU time grows fast to the last
        rates = [(t1, (sum(s1.values()) - sum(s0.values())) / (t1 - t0)) for (t0, s0), (t1, s1) in zip(busy, busy[1:])]
        scoring = [(t, r) for t, r in rates if r > 0.5]
        if not scoring:
            print(f"{precision}: the replica was never seen scoring")
            continue
        first, last = scoring[0][0], scoring[-1][0]
        span = [s for t, s in busy if first - 0.5 <= t <= last]
        window = [(m, p) for t, _, m, p in samples if first - 0.5 <= t <= last]
        others = {name: window[-1][1][name] - window[0][1].get(name, 0.0) for name in window[-1][1]}
        used = {tid: span[-1].get(tid, 0) - span[0].get(tid, 0) for tid in span[-1]}
        working = sorted(used.values(), reverse=True)
        print(f"{precision} ({summary.precision}): {summary.rows_written:,} rows in {wall:.1f} s "
              f"({summary.rows_written / wall:,.0f} rows/s); replica scored for {last - first:.1f} s using "
              f"{sum(working) / (last - first):.2f} cores; its busiest threads: "
              + ", ".join(f"{s / (last - first):.2f}" for s in working[:4])
              + f"; before its first row {first - started:.1f} s, after its last {started + wall - last:.1f} s; "
              f"the machine meanwhile {(window[-1][0] - window[0][0]) / (last - first):.2f} cores busy, the most of "
              "them: " + ", ".join(f"{name} {s / (last - first):.2f}" for name, s in
                                   sorted(others.items(), key=lambda item: -item[1])[:6]),
              flush=True)


if __name__ == "__main__":
    main()
