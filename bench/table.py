"""The Delta table output: what a nightly incremental run costs, on local disk and on an S3
endpoint (moto's server on loopback), and the first full run's rate.

    python bench/table.py [--files 50] [--rows 2000] [--baseline-checkout DIR]

An archive of `--files` Parquet files is scored in full, then one file is added and an
incremental run scores it: the script prints each run's seconds, rows/s and bytes written, and
whether the incremental run left every earlier data file as it was. `--baseline-checkout` names a
checkout of an earlier spamray (for example `git worktree add /tmp/old HEAD~5`): its full run on
the same archive and model is timed too, both as fresh `spamray score` processes, and the ratio
printed (the two full runs in turn, twice). The smallest preset keeps the model's share small, so the runs measure the output path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from loopback_s3 import start_s3_endpoint  # noqa: E402

from spamray import TextClassifier
from spamray.model import GPTModel, preset_config
from spamray.prepare import read_labelled

# `spamray score` with the summary on stdout, in a fresh process (the baseline's code, where given).
RUN_AND_REPORT = """
import json, sys
from spamray.cli import build_parser, config_from_args
from spamray.ray_runtime import start_ray
from spamray.config import ScoreConfig
from spamray.score import score
start_ray()
summary = score(config_from_args(ScoreConfig, build_parser().parse_args(sys.argv[1:])))
summary = summary if isinstance(summary, dict) else __import__("dataclasses").asdict(summary)  # earlier releases: a dict
print("SUMMARY", json.dumps(summary))
"""


def start_s3() -> subprocess.Popen:
    server, settings = start_s3_endpoint()
    os.environ.update(settings)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def spamray_score(args: list[str], pythonpath: str | None = None) -> tuple[dict, float]:
    """One `spamray score` in a fresh process: (its summary, wall seconds including Ray start)."""
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    start = time.perf_counter()
    # Not in this checkout's folder: `python -c` puts the working folder first on the path, and
    # would import the spamray there instead of the one PYTHONPATH names.
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, "score", *args], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    line = next(line for line in done.stdout.splitlines() if line.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):]), seconds


def data_files(fs, folder: str) -> dict[str, int]:
    """Every data file under the table folder (partition folders included), with its size."""
    return {p: info["size"] for p, info in fs.find(folder, detail=True).items()
            if p.endswith(".parquet") and "/_delta_log/" not in p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--rows", type=int, default=2000, help="rows per archive file")
    parser.add_argument("--baseline-checkout", help="an earlier spamray checkout to time the full run against")
    args = parser.parse_args()
    import fsspec

    server = start_s3()
    work = tempfile.mkdtemp(prefix="spamray-bench-table-")
    try:
        texts = read_labelled("sms")["text"].tolist()
        torch.manual_seed(0)
        model = f"{work}/model"
        TextClassifier.from_gpt2(GPTModel(preset_config("gpt2-tiny")), ["not spam", "spam"], max_length=128).save(model)
        archive = f"{work}/archive"
        os.makedirs(archive)
        for index in range(args.files + 1):
            rows = [texts[(index * args.rows + i) % len(texts)] for i in range(args.rows)]
            pq.write_table(pa.table({"text": rows}), f"{archive}/day-{index:03d}.parquet")
        new_file = f"{archive}/day-{args.files:03d}.parquet"
        held_back = f"{work}/held-back.parquet"
        os.rename(new_file, held_back)
        s3 = fsspec.filesystem("s3")
        s3.put(archive + "/", "bench/archive/", recursive=True)
        common = ["--model", model, "--incremental", "--cpus-per-replica", "2", "--precision", "fp32"]  # both checkouts alike
        print(f"{args.files} files x {args.rows:,} rows, then one more; gpt2-tiny; fresh `spamray score` processes")
        print(f"{'code':<9} {'where':<6} {'run':<18} {'seconds':>8} {'rows/s':>9} {'rows':>9} {'bytes written':>14} "
              f"{'files +/-':>10}")
        places = (("local", work, fsspec.filesystem("file")), ("s3", "s3://bench", s3))
        checkouts = [("this", None)] + ([("baseline", args.baseline_checkout)] if args.baseline_checkout else [])
        for code, pythonpath in checkouts:
            for where, root, fs in places:
                source, out = f"{root}/archive", f"{root}/scores-{code}"
                full, full_s = spamray_score(["--input", source, "--output", out, *common], pythonpath)
                before = data_files(fs, out)
                fs.put_file(held_back, new_file if where == "local" else f"bench/archive/{os.path.basename(new_file)}")
                night, night_s = spamray_score(["--input", source, "--output", out, *common], pythonpath)
                fs.rm(new_file if where == "local" else f"bench/archive/{os.path.basename(new_file)}")
                after = data_files(fs, out)
                untouched = all(after.get(path) == size for path, size in before.items())
                for name, summary, seconds in (("first, full", full, full_s), ("next night, +1", night, night_s)):
                    print(f"{code:<9} {where:<6} {name:<18} {seconds:>8.1f} {summary['rows_written'] / seconds:>9,.0f} "
                          f"{summary['rows_written']:>9,} {summary['bytes_written']:>14,} "
                          f"{summary['data_files_added']:>5}/{summary['data_files_removed']:<4}")
                print(f"{code:<9} {where:<6} earlier data files untouched by the incremental run: {untouched}")
        if args.baseline_checkout:
            rows = args.files * args.rows
            for round_ in (1, 2):  # in turn, so that the machine's drift falls on both
                _, new_s = spamray_score(["--input", f"{work}/archive", "--output", f"{work}/scores-new-{round_}",
                                          "--model", model, "--cpus-per-replica", "2"])
                _, old_s = spamray_score(["--input", f"{work}/archive", "--output", f"{work}/scores-old-{round_}",
                                          "--model", model, "--cpus-per-replica", "2"], pythonpath=args.baseline_checkout)
                print(f"full run {round_}, local, {rows:,} rows: this checkout {rows / new_s:,.0f} rows/s, "
                      f"baseline {rows / old_s:,.0f} rows/s: {old_s / new_s:.2f}x")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
