"""A store that fails on purpose, at every request of a night: the run's exit and message are
true (a run that says it committed did; one that says nothing was committed left the table as
it was), and after one clean night the table holds exactly one row per current input row, read
the same by spamray, deltalake and Polars, with no log entry naming a missing file. On local disk
(every request spamray makes through fsspec) and on the S3 endpoint (every request, delta-rs's
too).

The night: `a.parquet` unchanged since the night before, `b.csv` rewritten; an incremental run
scores b and replaces its old rows in one commit. A clean night's requests
are counted first; then each position (the n-th request of a kind and area) fails from then on
(503), in turn. Random schedules mix 500s, 503s, resets before and after the store acted, stalls
and slow answers, in bursts, under fixed seeds. SPAMRAY_FAULT_SOAK=N runs every action at every
position and N random schedules (a soak run, outside the suite).
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import time
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

import faulty_local
from faults import ACTIONS, Fault, Request, positions, random_schedule
from spamray import saved
from spamray.config import ScoreConfig
from spamray.errors import SpamrayError
from spamray.inputs import list_input_files
from spamray.score import score
from spamray.scores_layout import is_scored
from spamray.scores_table import CommitUnknown, ScoresTable

SOAK = int(os.environ.get("SPAMRAY_FAULT_SOAK", "0"))
RANDOM_SCHEDULES = SOAK or 4  # per place, in the suite
OUTAGE = 10**6  # a fault that lasts until the night ends
STALL_S = 1.0  # how long a stall holds a request before the connection is cut


class Store:
    """One place (local disk or the S3 endpoint) and the switch of its faults."""

    def __init__(self, place, kind: str, proxy=None):
        self.place, self.kind, self.proxy = place, kind, proxy

    def set(self, faults: list[Fault]) -> None:
        if self.proxy is not None:
            self.proxy.set(faults)
        else:
            faulty_local.set_schedule(faults)

    def log(self) -> list[Request]:
        return self.proxy.log() if self.proxy is not None else faulty_local.request_log()

    def clear(self) -> None:
        if self.proxy is not None:
            self.proxy.set([])
        else:
            faulty_local.clear_schedule()

    def copy_table(self, source: str, target: str) -> None:
        fs = self.place.fs
        if self.proxy is None:
            shutil.copytree(source, target)
        else:
            fs.copy(fs._strip_protocol(source), fs._strip_protocol(target), recursive=True)


@pytest.fixture(params=["local", "s3"])
def store(request, ray_local, tmp_path):
    if request.param == "s3":
        place, proxy = request.getfixturevalue("s3_place"), request.getfixturevalue("s3_endpoint")
    else:
        from conftest import Place

        (tmp_path / "place").mkdir()
        place, proxy = Place(str(tmp_path / "place")), None
    store = Store(place, request.param, proxy)
    yield store
    store.clear()


def put(place, name: str, data: bytes) -> str:
    place.fs.makedirs(f"{place.path}/{name}".rsplit("/", 1)[0], exist_ok=True)
    place.fs.pipe_file(f"{place.path}/{name}", data)
    return place.join(name)


def parquet_bytes(texts: list[str]) -> bytes:
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), buffer)
    return buffer.getvalue().to_pybytes()


def csv_bytes(texts: list[str]) -> bytes:
    return ("text\n" + "".join(f'"{t.replace(chr(34), chr(34) * 2)}"\n' for t in texts)).encode()


@dataclass
class Night:
    """The night before (a pristine table to copy), the inputs as they are now, what they hold."""

    store: Store
    model: str
    pristine: str
    archive: str
    rows: dict[str, int]  # each current input -> its rows
    model_version: str
    counter: int = 0

    def table(self) -> str:
        """A fresh copy of the table as the night before left it."""
        self.counter += 1
        target = self.store.place.join(f"tables/t{self.counter}")
        self.store.copy_table(self.pristine, target)
        return target

    def config(self, table: str, **options) -> ScoreConfig:
        return ScoreConfig(model=self.model, input=self.archive, output=table, incremental=True,
                           cpus_per_replica=1, **options)


@pytest.fixture
def night(store, model_url, sms_messages) -> Night:
    place = store.place
    a = put(place, "archive/a.parquet", parquet_bytes(sms_messages[:6]))
    b = put(place, "archive/b.csv", csv_bytes(sms_messages[6:11]))
    pristine = place.join("pristine")
    score(ScoreConfig(model=model_url, input=place.join("archive"), output=pristine, incremental=True))
    time.sleep(1.1)  # a new modification time on local disk
    b = put(place, "archive/b.csv", csv_bytes(sms_messages[20:24]))
    return Night(store, model_url, pristine, place.join("archive"), {a: 6, b: 4},
                 saved.model_version(saved.read_metadata(model_url)))


# -- what a faulted night must keep true ----------------------------------------------------------
@dataclass
class Outcome:
    claim: str  # "committed" (what the summary says is so), "nothing committed", or "unknown"
    message: str = ""
    summary: object = None


def faulted_night(night: Night, table: str, faults: list[Fault]) -> tuple[Outcome, list[Request]]:
    """One night under `faults`, and what it claims. An exception that is not spamray's own clear
    error (a traceback) is a defect."""
    night.store.set(faults)
    try:
        summary = score(night.config(table))
        outcome = Outcome("committed", summary=summary)
    except CommitUnknown as error:
        outcome = Outcome("unknown", str(error))
    except SpamrayError as error:
        outcome = Outcome("nothing committed", str(error))
    finally:
        log = night.store.log()
        night.store.clear()
    return outcome, log


def check_claim(night: Night, table: str, outcome: Outcome) -> None:
    state = ScoresTable(table).read_state()
    pristine = ScoresTable(night.pristine).read_state()
    if outcome.claim == "nothing committed":
        assert state.version == pristine.version and state.inputs == pristine.inputs, outcome.message
        assert "nothing" in outcome.message and "next run" in outcome.message, outcome.message
    elif outcome.claim == "unknown":
        assert "unknown" in outcome.message and "files are kept" in outcome.message, outcome.message
    else:
        summary = outcome.summary
        for file in list_input_files(night.archive)[0]:
            assert is_scored(state, file, night.model_version) == (file.url not in summary.files_failed), summary
        if summary.files_scored:
            assert ScoresTable(table).run_of(summary.table_version) == summary.run_id


def check_table(night: Night, table: str) -> None:
    """One row per current input row, read alike by spamray, deltalake and Polars; every file the
    log names exists."""
    scores = ScoresTable(table)
    state = scores.read_state()
    named = {path for scored in state.inputs.values() for path in scored.files}
    existing = {p[len(scores.path) + 1:] for p in scores.fs.find(scores.path) if p.endswith(".parquet")}
    assert named <= existing, f"the log names files that are gone: {sorted(named - existing)}"
    spamray_rows = scores.read(columns=["source_file", "source_row"]).to_pylist()
    counts = collections.Counter(row["source_file"] for row in spamray_rows)
    assert dict(counts) == night.rows and len(set(map(tuple, map(dict.values, spamray_rows)))) == len(spamray_rows)
    expected = sorted((row["source_file"], row["source_row"]) for row in spamray_rows)
    for reader, rows in [("deltalake", DeltaTable(scores.url).to_pyarrow_table(columns=["source_file", "source_row"])),
                         ("polars", pl.read_delta(scores.url).select("source_file", "source_row").to_arrow())]:
        assert sorted(zip(rows["source_file"].to_pylist(), rows["source_row"].to_pylist())) == expected, reader


def clean_night(night: Night, table: str) -> None:
    summary = score(night.config(table))
    assert summary.files_failed == {}, summary.files_failed
    check_table(night, table)


@dataclass
class Tally:
    runs: int = 0
    fired: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)

    def add(self, outcome: Outcome, log: list[Request]) -> None:
        self.runs += 1
        self.fired += any(request.fault for request in log)
        self.outcomes[outcome.claim] += 1


def one_night(night: Night, faults: list[Fault], tally: Tally) -> None:
    table = night.table()
    outcome, log = faulted_night(night, table, faults)
    tally.add(outcome, log)
    check_claim(night, table, outcome)
    if outcome.claim == "nothing committed" and folder(table) == folder(night.pristine):
        return  # untouched: its next night is the clean night already checked (clean_log)
    clean_night(night, table)


def folder(table: str) -> dict[str, int]:
    """The table's files (paths relative to it) and their sizes."""
    scores = ScoresTable(table)
    return {path[len(scores.path):]: info["size"] for path, info in scores.fs.find(scores.path, detail=True).items()}


def clean_log(night: Night) -> list[Request]:
    table = night.table()
    outcome, log = faulted_night(night, table, [])
    assert outcome.claim == "committed" and outcome.summary.files_scored == 1 and not outcome.summary.files_failed
    check_table(night, table)
    return log


# -- the tests ------------------------------------------------------------------------------------
def test_a_fault_at_every_request_position_keeps_the_table_true(night, capsys):
    log = clean_log(night)
    tally = Tally()
    actions = ACTIONS if SOAK else ("503",)
    for kind, area, n in positions(log):
        for action in actions:
            fault = Fault(kind, n, action, area, count=1 if action in ("delay", "reset_after") else OUTAGE,
                          seconds=STALL_S)
            one_night(night, [fault], tally)
    with capsys.disabled():
        print(f"\n{night.store.kind}: {len(log)} request positions x {len(actions)} action(s): {tally.runs} nights, "
              f"{tally.fired} with a fault fired; claims {dict(tally.outcomes)}")


def test_random_fault_schedules_keep_the_table_true(night, capsys):
    log = clean_log(night)
    tally = Tally()
    for seed in range(RANDOM_SCHEDULES):
        rng = random.Random(seed)
        faults = random_schedule(rng, log, ACTIONS, faults=rng.randint(1, 4), longest_burst=15)
        for fault in faults:
            fault.seconds = STALL_S if fault.action == "timeout" else 0.3
        one_night(night, faults, tally)
    with capsys.disabled():
        print(f"\n{night.store.kind}: {tally.runs} random schedules, {tally.fired} with a fault fired; "
              f"claims {dict(tally.outcomes)}")
