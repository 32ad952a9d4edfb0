"""Randomized nights against a model of what the table should hold.

A seeded generator adds, rewrites, deletes and corrupts input files; runs incremental and
`--overwrite` nights, nights killed at a random moment, and two nights at once; compacts and
vacuums the table. After each step the table is checked against a plain in-memory model: for
each input the rows of the content last scored, each once, with that content's size and version,
and every file the log names in place. Killed and overlapping runs are drivers of their own that
join the session's Ray, as `ray job submit` would. SPAMRAY_RANDOM_NIGHTS=N runs N seeds of a
longer setting (a soak run, outside the suite).
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from conftest import SPAMRAY
from spamray.config import ScoreConfig
from spamray.inputs import InputFile, list_input_files
from spamray.score import score
from spamray.scores_table import ScoresTable

SOAK = int(os.environ.get("SPAMRAY_RANDOM_NIGHTS", "0"))
SEEDS = range(SOAK) if SOAK else range(2)  # in the suite: one seed on each place
STEPS = 40 if SOAK else 12
STEP_WEIGHTS = {"add": 4, "rewrite": 3, "delete": 1, "corrupt": 1, "incremental": 4, "overwrite": 1, "killed": 1,
                "overlapping": 1, "compact": 1, "vacuum": 1}


@dataclass(frozen=True)
class Scored:
    rows: int
    size: int
    version: str


@dataclass
class Model:
    """The archive as it is, and what the table must hold for each input."""

    files: dict[str, list[str] | None] = field(default_factory=dict)  # url -> texts (None: corrupt)
    table: dict[str, Scored] = field(default_factory=dict)

    def after_run(self, listed: dict[str, InputFile], mode: str) -> None:
        """An incremental run scores every readable input; --overwrite also drops the rows of
        inputs that are gone. A corrupt input fails and keeps its earlier rows either way."""
        if mode == "overwrite":
            self.table = {url: scored for url, scored in self.table.items() if url in self.files}
        for url, texts in self.files.items():
            if texts is not None:
                self.table[url] = Scored(len(texts), listed[url].size, listed[url].version)

    def corrupt(self) -> set[str]:
        return {url for url, texts in self.files.items() if texts is None}


class Nights:
    def __init__(self, place, model_url: str, messages: list[str], rng: random.Random):
        self.place, self.model_url, self.messages, self.rng = place, model_url, messages, rng
        self.archive, self.out = place.join("archive"), place.join("scores")
        self.model, self.counter, self.done = Model(), 0, collections.Counter()

    # -- the archive ------------------------------------------------------------------------
    def write(self, name: str, texts: list[str] | None) -> str:
        url = f"{self.archive}/{name}"
        path = f"{self.place.path}/archive/{name}"
        self.place.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if texts is None:  # a Parquet file cut short, or a CSV whose quote never closes
            data = b"PAR1 cut short" if name.endswith(".parquet") else b'text\n"never closed\nmore\n'
        elif name.endswith(".parquet"):
            buffer = pa.BufferOutputStream()
            pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), buffer)
            data = buffer.getvalue().to_pybytes()
        else:
            data = ("text\n" + "".join('"' + t.replace('"', '""') + '"\n' for t in texts)).encode()
        self.place.fs.pipe_file(path, data)
        self.model.files[url] = texts
        return url

    def texts(self) -> list[str]:
        start = self.rng.randrange(len(self.messages) - 20)
        return self.messages[start:start + self.rng.randint(0, 12)]

    def add(self) -> None:
        self.counter += 1
        self.write(f"f{self.counter}.{self.rng.choice(['parquet', 'csv'])}", self.texts())

    def pick(self) -> str | None:
        return self.rng.choice(sorted(self.model.files)) if self.model.files else None

    def rewrite(self) -> None:
        if (url := self.pick()) is not None:
            old = self.model.files[url]
            new = self.texts()
            while new == old:
                new = self.texts()
            time.sleep(0.02)  # a new modification time on local disk
            self.write(url.rsplit("/", 1)[1], new)

    def delete(self) -> None:
        if (url := self.pick()) is not None:
            self.place.fs.rm(f"{self.place.path}/archive/{url.rsplit('/', 1)[1]}")
            del self.model.files[url]

    def corrupt(self) -> None:
        if (url := self.pick()) is not None:
            self.write(url.rsplit("/", 1)[1], None)

    # -- runs -------------------------------------------------------------------------------
    def listed(self) -> dict[str, InputFile]:
        return {file.url: file for file in list_input_files(self.archive)[0]} if self.model.files else {}

    def config(self, mode: str) -> ScoreConfig:
        return ScoreConfig(model=self.model_url, input=self.archive, output=self.out, incremental=mode == "incremental",
                           overwrite=mode == "overwrite", cpus_per_replica=1)

    def run(self, mode: str) -> None:
        if not self.model.files:  # (an archive with no files is refused: nothing to model)
            return
        listed = self.listed()
        summary = score(self.config(mode))
        assert set(summary.files_failed) == self.model.corrupt(), summary.files_failed
        if self.readable():  # (with none, even --overwrite has nothing to commit)
            self.model.after_run(listed, mode)

    def readable(self) -> bool:
        return any(texts is not None for texts in self.model.files.values())

    def incremental(self) -> None:
        self.run("incremental")

    def overwrite(self) -> None:
        self.run("overwrite")

    def driver(self, mode: str) -> subprocess.Popen:
        """`spamray score` in a driver of its own that joins this session's Ray."""
        import ray

        args = ["score", "--model", self.model_url, "--input", self.archive, "--output", self.out, f"--{mode}",
                "--cpus-per-replica", "1"]
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
               "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
        return subprocess.Popen([sys.executable, "-c", SPAMRAY, *args], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def killed(self) -> None:
        """A night killed at a random moment: the table is as before, or the run's commit landed
        whole (then its effect is a run's)."""
        if not self.readable():
            return
        listed, before = self.listed(), ScoresTable(self.out).read_state().version
        process = self.driver("incremental")
        time.sleep(self.rng.uniform(1.0, 12.0))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        after = ScoresTable(self.out).read_state().version
        if after != before:
            self.model.after_run(listed, "incremental")

    def overlapping(self) -> None:
        """Two nights at once on the same table: the same rows as one."""
        if not self.readable():
            return
        listed = self.listed()
        other = self.driver("incremental")
        summary = score(self.config("incremental"))
        code = other.wait(timeout=600)
        expected = 1 if self.model.corrupt() else 0
        assert code == expected, other.stderr.read()[-2000:]
        assert set(summary.files_failed) == self.model.corrupt()
        self.model.after_run(listed, "incremental")

    # -- maintenance -------------------------------------------------------------------------
    def compact(self) -> None:
        if ScoresTable(self.out).read_state().version is not None:
            DeltaTable(ScoresTable(self.out).url).optimize.compact()

    def vacuum(self) -> None:
        if ScoresTable(self.out).read_state().version is not None:
            ScoresTable(self.out).vacuum_removed(0)  # replaced and compacted files, at once

    # -- the check -----------------------------------------------------------------------------
    def check(self, readers: bool = False) -> None:
        table = ScoresTable(self.out)
        if table.read_state().version is None:
            assert not self.model.table
            return
        state = table.read_state()
        named = {path for scored in state.inputs.values() for path in scored.files}
        existing = {p[len(table.path) + 1:] for p in table.fs.find(table.path) if p.endswith(".parquet")}
        assert named <= existing, f"the log names files that are gone: {sorted(named - existing)}"
        rows = table.read(columns=["source_file", "source_row", "source_size", "source_version"]).to_pylist()
        found: dict[str, list[int]] = collections.defaultdict(list)
        identity = collections.defaultdict(set)
        for row in rows:
            found[row["source_file"]].append(row["source_row"])
            identity[row["source_file"]].add((row["source_size"], row["source_version"]))
        expected = {url: scored for url, scored in self.model.table.items() if scored.rows}
        assert set(found) == set(expected), (sorted(found), sorted(expected))
        for url, scored in expected.items():
            assert sorted(found[url]) == list(range(scored.rows)), url
            assert identity[url] == {(scored.size, scored.version)}, url
        if readers:
            expected_pairs = sorted((row["source_file"], row["source_row"]) for row in rows)
            for name, read in [("deltalake", DeltaTable(table.url).to_pyarrow_table(columns=["source_file", "source_row"])),
                               ("polars", pl.read_delta(table.url).select("source_file", "source_row").to_arrow())]:
                assert sorted(zip(read["source_file"].to_pylist(), read["source_row"].to_pylist())) == expected_pairs, name

    def step(self) -> str:
        name = self.rng.choices(list(STEP_WEIGHTS), weights=list(STEP_WEIGHTS.values()))[0]
        getattr(self, name)()
        self.done[name] += 1
        self.check(readers=name in ("compact", "vacuum", "killed"))
        return name


@pytest.mark.parametrize("seed", SEEDS)
def test_random_nights_hold_what_a_plain_model_says(ray_local, model_url, sms_messages, tmp_path, seed, capsys,
                                                    request):
    place = request.getfixturevalue("s3_place") if seed % 2 else local_place(tmp_path)
    nights = Nights(place, model_url, sms_messages, random.Random(seed))
    nights.add()
    nights.incremental()
    for _ in range(STEPS):
        nights.step()
    nights.incremental()
    nights.check(readers=True)
    with capsys.disabled():
        print(f"\nseed {seed} ({'s3' if seed % 2 else 'local'}): steps {dict(nights.done)}; "
              f"{len(nights.model.files)} inputs, {sum(s.rows for s in nights.model.table.values())} rows")


def local_place(tmp_path):
    from conftest import Place

    (tmp_path / "place").mkdir()
    return Place(str(tmp_path / "place"))
