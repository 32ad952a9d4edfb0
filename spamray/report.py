"""What the filter did, night after night: a scores table's runs read back from its commits and
rows, for the people who run it.

Each run's commit records what it did (see score.py and scores_sink.py): the model, precision and
threshold, the files scored, failed and skipped, its rows per status and per label, when it
started. The report reads those records from the table's history, and the positive class's
probabilities of each run's rows from the table itself (only the columns it needs), and gives
per run:

- volume, files and statuses, and rows per second from its start to its commit;
- the spam share: rows labelled the positive class among the rows labelled at all;
- drift against a reference run, which needs no labels: the population stability index (PSI) of
  the positive class's probability over PSI_BINS equal bins of [0, 1], and the change in spam
  share. The reference is a run you name, by default the table's first.

In a shadow table (`spamray score --shadow`), each run also gets the candidate's agreement with
the model in use and its flips each way, from the two label columns of its rows.

A run's probabilities are those of its rows the table still holds: rows an input's newer scoring
replaced are gone (their counts stay in the record), so such a run has no PSI. The history is as
long as the table's log is kept (Delta's logRetentionDuration, 30 days by default).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from .classifier import probability_column
from .scores_table import ScoresTable

PSI_BINS = 20
# An empty bin's share in the PSI: its log needs both shares above zero. 1e-4 is the common
# choice: a bin one night fills and the reference left empty adds a large, finite term.
PSI_EMPTY_SHARE = 1e-4


@dataclass(frozen=True)
class RunRecord:
    """What a scoring run's commit says it did."""

    run_id: str
    version: int
    started: datetime
    committed: datetime
    model: str
    model_version: str
    precision: str
    threshold: float | None
    labels: list[str]
    positive: str | None
    files_scored: int
    files_failed: dict[str, str]
    files_skipped: int
    rows: int
    rows_per_status: dict[str, int]
    rows_per_label: dict[str, int]
    in_use_version: str | None = None  # a shadow run's model in use (the run's own model is the candidate)

    @classmethod
    def from_commit(cls, commit: dict) -> RunRecord | None:
        """The run a commit of the table's history records; None for other commits (the table's
        creation, maintenance such as compaction)."""
        if "spamray" not in commit:
            return None
        record = commit["spamray"]
        record = json.loads(record) if isinstance(record, str) else record
        return cls(run_id=record["run_id"], version=commit["version"],
                   started=datetime.fromtimestamp(record["started"], timezone.utc),
                   committed=datetime.fromtimestamp(commit["timestamp"] / 1000, timezone.utc),
                   model=record["model"], model_version=record["model_version"], precision=record["precision"],
                   threshold=record["threshold"], labels=record["labels"], positive=record["positive"],
                   files_scored=record["files_scored"], files_failed=record["files_failed"],
                   files_skipped=record["files_skipped"], rows=record["rows"],
                   rows_per_status=record["rows_per_status"], rows_per_label=record["rows_per_label"],
                   in_use_version=record["in_use"]["model_version"] if "in_use" in record else None)

    @property
    def positive_share(self) -> float | None:
        """The share of labelled rows labelled the positive class."""
        labelled = sum(count for label, count in self.rows_per_label.items() if label in self.labels)
        return self.rows_per_label.get(self.positive, 0) / labelled if labelled and self.positive else None

    @property
    def rows_per_second(self) -> float:
        return self.rows / max((self.committed - self.started).total_seconds(), 1e-3)


@dataclass(frozen=True)
class Comparison:
    """A shadow run's candidate against the model in use, over the rows both labelled."""

    rows: int
    agree: int
    to_positive: int  # the model in use said another class, the candidate the positive one
    to_negative: int  # the model in use said the positive class, the candidate another
    in_use_positive: int  # rows the model in use labelled positive

    @property
    def agreement(self) -> float | None:
        return self.agree / self.rows if self.rows else None

    @property
    def in_use_share(self) -> float | None:
        return self.in_use_positive / self.rows if self.rows else None


@dataclass(frozen=True)
class RunReport:
    """One run as the report shows it."""

    record: RunRecord
    rows_held: int  # rows of this run the table still holds (with a probability)
    histogram: list[float]  # the share of those rows in each of PSI_BINS bins (empty: none held)
    psi: float | None  # against the reference; None where this run or the reference holds no rows
    share_change: float | None  # spam share minus the reference's
    comparison: Comparison | None = None  # a shadow run's flips


@dataclass(frozen=True)
class AlertLimits:
    """What makes `spamray report` exit non-zero: a run past any limit set."""

    max_psi: float | None = None
    max_failed_files: int | None = None
    max_share_change: float | None = None


@dataclass(frozen=True)
class TableReport:
    table: str
    positive: str
    reference: RunReport
    runs: list[RunReport] = field(default_factory=list)

    def alerts(self, limits: AlertLimits) -> list[str]:
        """One line per run and limit it passes."""
        found = []
        for run in self.runs:
            name = run.record.run_id
            if limits.max_psi is not None and run.psi is not None and run.psi > limits.max_psi:
                found.append(f"{name}: PSI {run.psi:.3f} > {limits.max_psi:g} against {self.reference.record.run_id}")
            if limits.max_failed_files is not None and len(run.record.files_failed) > limits.max_failed_files:
                found.append(f"{name}: {len(run.record.files_failed)} failed file(s) > {limits.max_failed_files}: "
                             f"{', '.join(run.record.files_failed)}")
            if (limits.max_share_change is not None and run.share_change is not None
                    and abs(run.share_change) > limits.max_share_change):
                found.append(f"{name}: {self.positive} share changed by {run.share_change:+.2%} (limit "
                             f"{limits.max_share_change:.2%})")
        return found

    def to_json(self) -> dict:
        """Each run under its run id, and the reference's."""
        def run_json(run: RunReport) -> dict:
            record = asdict(run.record)
            record["started"], record["committed"] = run.record.started.isoformat(), run.record.committed.isoformat()
            comparison = run.comparison and {**asdict(run.comparison), "agreement": run.comparison.agreement,
                                             "in_use_share": run.comparison.in_use_share}
            return {**record, "positive_share": run.record.positive_share,
                    "rows_per_second": run.record.rows_per_second, "rows_held": run.rows_held,
                    "histogram": run.histogram, "psi": run.psi, "share_change": run.share_change,
                    "comparison": comparison}

        return {"table": self.table, "positive": self.positive, "psi_bins": PSI_BINS,
                "reference": self.reference.record.run_id, "reference_histogram": self.reference.histogram,
                "runs": {run.record.run_id: run_json(run) for run in self.runs}}


# -- computing it ---------------------------------------------------------------------------------
def histogram(probabilities: np.ndarray) -> np.ndarray:
    """The share of `probabilities` in each of PSI_BINS equal bins of [0, 1]."""
    counts, _ = np.histogram(probabilities, bins=PSI_BINS, range=(0.0, 1.0))
    return counts / max(counts.sum(), 1)


def population_stability_index(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI = sum over bins of (current - reference) * ln(current / reference), on bin shares,
    empty bins at PSI_EMPTY_SHARE. Below 0.1 is usually read as stable, above 0.25 as a shift."""
    expected = np.maximum(reference, PSI_EMPTY_SHARE)
    actual = np.maximum(current, PSI_EMPTY_SHARE)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def read_runs(delta) -> list[RunRecord]:
    """Every scoring run the history of `delta` (a deltalake DeltaTable) records, oldest first."""
    runs = [RunRecord.from_commit(commit) for commit in delta.history()]
    return sorted((run for run in runs if run is not None), key=lambda run: run.version)


def select_runs(runs: list[RunRecord], since: datetime | None, last: int | None) -> list[RunRecord]:
    """The runs committed at or after `since`, then the `last` of them."""
    chosen = [run for run in runs if since is None or run.committed >= since]
    return chosen[-last:] if last else chosen


@dataclass
class HeldRows:
    """What the table holds of one run: its positive-class probabilities, and in a shadow table
    both models' labels (scored rows only)."""

    probabilities: np.ndarray
    labels: np.ndarray | None = None
    in_use_labels: np.ndarray | None = None


def held_rows(table: ScoresTable, delta, positive: str, runs: set[str]) -> dict[str, HeldRows]:
    """The rows the table (its log loaded in `delta`) holds of each of `runs`, reading only their
    files and the columns the report needs."""
    column, shadow = probability_column(positive), "in_use_label" in pa.schema(delta.schema().to_arrow()).names
    rows = table.read(columns=["run_id", column] + (["label", "in_use_label"] if shadow else []), runs=runs, delta=delta)
    probabilities = rows[column].to_numpy(zero_copy_only=False).astype(np.float64)
    scored = ~np.isnan(probabilities)
    runs = rows["run_id"].to_numpy(zero_copy_only=False)[scored]
    order = np.argsort(runs, kind="stable")
    run_ids, starts = np.unique(runs[order], return_index=True)

    def per_run(values: np.ndarray) -> list[np.ndarray]:
        return np.split(values[scored][order], starts[1:])

    if not shadow:
        return {run: HeldRows(p) for run, p in zip(run_ids, per_run(probabilities))}
    labels, in_use = (per_run(rows[name].to_numpy(zero_copy_only=False)) for name in ("label", "in_use_label"))
    return {run: HeldRows(p, a, b) for run, p, a, b in zip(run_ids, per_run(probabilities), labels, in_use)}


def compare(held: HeldRows, positive: str) -> Comparison:
    candidate, in_use = held.labels == positive, held.in_use_labels == positive
    return Comparison(rows=len(candidate), agree=int((held.labels == held.in_use_labels).sum()),
                      to_positive=int((candidate & ~in_use).sum()), to_negative=int((~candidate & in_use).sum()),
                      in_use_positive=int(in_use.sum()))


def report(table_url: str, since: datetime | None = None, last: int | None = None,
           reference: str | None = None) -> TableReport:
    """The report of `table_url`'s runs (committed at or after `since`, the `last` N of them),
    drift measured against the run `reference` (default: the table's first)."""
    table = ScoresTable(table_url)
    if not table.has_log():
        raise FileNotFoundError(f"{table.url} holds no Delta table (no _delta_log): name a table `spamray score` "
                                "wrote into")
    from deltalake import DeltaTable

    delta = DeltaTable(table.url)  # the log, loaded once for the history, the schema and the files
    runs = read_runs(delta)
    if not runs:
        raise ValueError(f"{table.url} records no scoring run: score into it first")
    by_id = {run.run_id: run for run in runs}
    if reference is not None and reference not in by_id:
        raise ValueError(f"--reference {reference!r}: no run of {table.url} has that id; its runs are "
                         f"{', '.join(list(by_id)[-5:])} (the latest five)")
    reference_run = by_id[reference] if reference else runs[0]
    positive = reference_run.positive
    if positive is None:
        raise ValueError(f"{table.url}: the classifier of run {reference_run.run_id} names no positive class "
                         f"(labels {reference_run.labels}), so there is no spam share to report")
    chosen = select_runs(runs, since, last)
    held = held_rows(table, delta, positive, {run.run_id for run in [reference_run, *chosen]})
    reference_report = run_report(reference_run, held, None, None)
    return TableReport(table.url, positive, reference_report,
                       [run_report(run, held, reference_report, reference_run) for run in chosen])


def run_report(run: RunRecord, held: dict[str, HeldRows], reference: RunReport | None,
               reference_run: RunRecord | None) -> RunReport:
    rows = held.get(run.run_id)
    probabilities = rows.probabilities if rows is not None else np.empty(0)
    shares = histogram(probabilities) if len(probabilities) else np.empty(0)
    psi = share_change = None
    if reference is not None:
        if len(probabilities) and reference.rows_held:
            psi = population_stability_index(np.asarray(reference.histogram), shares)
        if run.positive_share is not None and reference_run.positive_share is not None:
            share_change = run.positive_share - reference_run.positive_share
    comparison = compare(rows, run.positive) if rows is not None and rows.labels is not None else None
    return RunReport(run, len(probabilities), shares.tolist(), psi, share_change, comparison)


def parse_since(text: str) -> datetime:
    """An ISO date or date and time (UTC unless it names its zone)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: give an ISO date or date and time, such as 2026-12-01 or "
                         "2026-12-01T18:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)

