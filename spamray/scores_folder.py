"""The scores output folder: written whole or not at all, with a manifest for incremental runs.

A run writes into a staging folder beside the output. Committing it: check that every input row
came through exactly once, carry over the earlier output still valid (incremental runs), write
`_manifest.json`, then swap the staging folder into place. On local disk the swap is two renames,
and a run killed between them is finished by the next one (the staging folder is complete by
then). On object stores, where there is no rename, the manifest is written last and names the
committed files: readers there go by the manifest.

Readers (pandas, pyarrow, Ray Data) skip names starting with `_` or `.`, so the manifest and
staging folders never show up as data.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .inputs import InputFile

MANIFEST = "_manifest.json"
FORMAT = "spamray-scores"


class ScoresFolder:
    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.path = storage.url_to_fs(self.url)
        self.local = storage.is_local(self.url)
        parent, _, name = self.path.rpartition("/")
        self._parent, self._name = parent or ".", name

    def staging_path(self, run_id: str) -> str:
        return f"{self._parent}/.{self._name}.staging-{run_id}"

    def staging_url(self, run_id: str) -> str:
        return self.staging_path(run_id) if self.local else self.fs.unstrip_protocol(self.staging_path(run_id))

    # -- state ----------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        manifest_path = f"{self.path}/{MANIFEST}"
        if self.fs.exists(manifest_path):
            manifest = json.loads(self.fs.cat_file(manifest_path))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"{self.url}/{MANIFEST} is not a spamray scores manifest")
            return manifest
        if self.fs.exists(self.path) and self.fs.ls(self.path):
            raise FileExistsError(f"{self.url} exists and is not a spamray scores folder (no {MANIFEST}); "
                                  "choose another --output")
        return None

    def recover(self, log=print) -> None:
        """Finishes a commit that was cut off between its two renames; removes abandoned staging."""
        stale = self.fs.glob(f"{self._parent}/.{self._name}.staging-*")
        trash = self.fs.glob(f"{self._parent}/.{self._name}.trash-*")
        if not self.fs.exists(self.path):
            complete = [path for path in stale if self.fs.exists(f"{path}/{MANIFEST}")]
            if complete:
                log(f"finishing the commit of an earlier run into {self.url}")
                self._rename(complete[0], self.path)
                stale.remove(complete[0])
        for path in stale + trash:
            self.fs.rm(path, recursive=True)

    # -- committing -----------------------------------------------------------------------
    def commit(self, run_id: str, manifest: dict, carried_over: list[str], dropped_sources: set[str]) -> None:
        """Carries over earlier output, writes the manifest, swaps in. Call `audit_staged` first."""
        staging = self.staging_path(run_id)
        if carried_over:
            self._carry_over(staging, dropped_sources)
        self.fs.pipe_file(f"{staging}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        if self.local:
            trash = f"{self._parent}/.{self._name}.trash-{run_id}"
            if os.path.exists(self.path):
                os.rename(self.path, trash)
            os.rename(staging, self.path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            self._publish_remote(staging)

    def _carry_over(self, staging: str, dropped_sources: set[str]) -> None:
        """Earlier output files into staging: linked as they are, or rewritten without the rows of
        input files that were scored again."""
        for path in self._data_files(self.path):
            target = f"{staging}/{path.rsplit('/', 1)[-1]}"
            if dropped_sources and self._holds_any(path, dropped_sources):
                table = pq.read_table(path, filesystem=self._arrow_fs())
                keep = pc.invert(pc.is_in(table["source_file"], pa.array(sorted(dropped_sources))))
                pq.write_table(table.filter(keep), target, filesystem=self._arrow_fs())
            elif self.local:
                os.link(path, target)  # no copy: the file does not change
            else:
                self.fs.copy(path, target)

    def _holds_any(self, path: str, sources: set[str]) -> bool:
        column = pq.read_table(path, columns=["source_file"], filesystem=self._arrow_fs())["source_file"]
        return bool(pc.any(pc.is_in(column, pa.array(sorted(sources)))).as_py())

    def _publish_remote(self, staging: str) -> None:
        new_files = self._data_files(staging)
        old_files = self._data_files(self.path) if self.fs.exists(self.path) else []
        for path in new_files:
            self.fs.copy(path, f"{self.path}/{path.rsplit('/', 1)[-1]}")
        self.fs.copy(f"{staging}/{MANIFEST}", f"{self.path}/{MANIFEST}")  # the commit point
        names = {path.rsplit("/", 1)[-1] for path in new_files}
        for path in old_files:
            if path.rsplit("/", 1)[-1] not in names:
                self.fs.rm(path)
        self.fs.rm(staging, recursive=True)

    def _data_files(self, folder: str) -> list[str]:
        return sorted(p for p in self.fs.find(folder) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(("_", ".")))

    def _rename(self, source: str, target: str) -> None:
        if self.local:
            os.rename(source, target)
        else:
            self.fs.mv(source, target, recursive=True)

    def _arrow_fs(self):
        return pa.fs.PyFileSystem(pa.fs.FSSpecHandler(self.fs))


@dataclass
class StagedAudit:
    """What one pass over a run's staged output found."""

    rows_per_file: dict[str, int]  # input file -> rows scored, each row exactly once
    rows_written: int = 0
    rows_per_status: Counter = field(default_factory=Counter)
    rows_per_label: Counter = field(default_factory=Counter)


def audit_staged(fs, staging: str, scored: list[InputFile], batch_rows: int = 65536) -> StagedAudit:
    """Proves that each scored file's rows are all there exactly once (source_row 0..n-1, no
    repeats) and counts statuses and labels. Parquet inputs are also checked against their row
    count. Streams the staged files: memory is one byte per input row, whatever the archive size."""
    tallies = {file.url: RowTally(file.url) for file in scored}
    audit = StagedAudit(rows_per_file={})
    for path in sorted(p for p in fs.find(staging) if p.endswith(".parquet")):
        with fs.open(path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(
                    batch_size=batch_rows, columns=["source_file", "source_row", "status", "label"]):
                _tally_sources(batch, tallies)
                audit.rows_written += batch.num_rows
                audit.rows_per_status.update(_value_counts(batch.column("status")))
                audit.rows_per_label.update(_value_counts(batch.column("label")))
    for file in scored:
        audit.rows_per_file[file.url] = tallies[file.url].complete_count()
        if file.format == "parquet":
            fs_in, path = storage.url_to_fs(file.url)
            with fs_in.open(path, "rb") as handle:
                expected = pq.ParquetFile(handle).metadata.num_rows
            if audit.rows_per_file[file.url] != expected:
                raise RuntimeError(f"{file.url} has {expected} rows but {audit.rows_per_file[file.url]} were scored; "
                                   "nothing was committed")
    return audit


class RowTally:
    """Which rows of one input file came through: a byte per row, so a repeat shows at once."""

    def __init__(self, source: str):
        self.source, self.seen = source, np.zeros(0, dtype=np.uint8)

    def add(self, rows: np.ndarray) -> None:
        if len(rows) and rows.min() < 0:
            raise RuntimeError(f"rows of {self.source} have a negative source_row; nothing was committed")
        if len(rows) and rows.max() >= len(self.seen):
            grown = np.zeros(max(int(rows.max()) + 1, 2 * len(self.seen)), dtype=np.uint8)
            grown[:len(self.seen)] = self.seen
            self.seen = grown
        if len(np.unique(rows)) != len(rows) or self.seen[rows].any():
            raise RuntimeError(f"rows of {self.source} did not come through exactly once (a row is there twice); "
                               "nothing was committed")
        self.seen[rows] = 1

    def complete_count(self) -> int:
        """Rows seen, after checking that they are 0..n-1 with none missing."""
        count = int(self.seen.sum())
        last = int(np.flatnonzero(self.seen)[-1]) + 1 if count else 0
        if count != last:
            raise RuntimeError(f"rows of {self.source} did not come through exactly once ({last - count} of rows "
                               f"0..{last - 1} are missing); nothing was committed")
        return count


def _tally_sources(batch: pa.RecordBatch, tallies: dict[str, RowTally]) -> None:
    sources = batch.column("source_file").dictionary_encode()
    rows = batch.column("source_row").to_numpy(zero_copy_only=False)
    indices = sources.indices.to_numpy(zero_copy_only=False)
    for index, name in enumerate(sources.dictionary.to_pylist()):
        if name not in tallies:
            raise RuntimeError(f"staged output holds rows of {name}, which this run did not score; nothing was committed")
        tallies[name].add(rows[indices == index])


def _value_counts(column: pa.Array) -> dict[str, int]:
    counts = column.value_counts()  # a null (an unscored row's label) counts under "None"
    return {str(value): int(count) for value, count in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def plan_run(manifest: dict | None, files: list[InputFile], model_version: str, incremental: bool,
             overwrite: bool, log=print) -> tuple[list[InputFile], list[str], set[str]]:
    """(files to score, earlier inputs whose output is carried over, inputs whose old rows go)."""
    if manifest is None:
        return files, [], set()
    if not incremental:
        if not overwrite:
            raise FileExistsError("the output already holds scores; pass --overwrite to replace them, or "
                                  "--incremental to score only new or changed files")
        return files, [], set()
    if manifest["model_version"] != model_version:
        log(f"model changed ({manifest['model_version']} -> {model_version}): scoring every file again")
        return files, [], set()
    done = manifest["inputs"]
    fresh = [f for f in files if f.url not in done or (done[f.url]["size"], done[f.url]["version"]) != (f.size, f.version)]
    changed = {f.url for f in fresh if f.url in done}
    carried = [url for url in done if url not in changed]
    return fresh, carried, changed


def build_manifest(previous: dict | None, carried: list[str], scored: list[InputFile], rows: dict[str, int],
                   run: dict, model: str, model_version: str, labels: list[str]) -> dict:
    inputs = {url: (previous or {})["inputs"][url] for url in carried}
    for file in scored:
        inputs[file.url] = {**asdict(file), "rows": rows[file.url], "run_id": run["run_id"]}
    runs = ((previous or {}).get("runs", []) if carried else []) + [run]
    return {"format": FORMAT, "format_version": 1, "model": model, "model_version": model_version,
            "labels": labels, "inputs": inputs, "runs": runs[-100:]}
