"""The scores output: a Delta Lake table, one atomic commit per run, safe when runs overlap. Its
layout, and the plan of what a run scores and commits, are in scores_layout.py.

Committing. The driver commits in one transaction the run's new files and the removal of the
files that held older rows of the same inputs: no version holds an input's rows half old, half
new, or gone. A run commits only against the table version it planned on; when another commit
came first, it plans again against the new version. It reads the outcome back rather than
trusting the answer: the commit that claims a version must carry this run's id, and a commit
reported as failed that landed all the same counts as committed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import SpamrayError, last_line
from .scores_layout import (IDENTITY, PARTITIONS, CommitPlan, CommitResult, RunOutput, ScoredInput, TableState,
                            delta_columns, partition_values, plan_commit)

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 20
# A full vacuum deletes every file no version names, also those of a run still scoring (they are
# named only when it commits): it is a maintenance step, never at less than this retention.
MIN_FULL_VACUUM_HOURS = 24.0


class TableError(SpamrayError, RuntimeError):
    """The table, or a commit to it, is not as it must be; nothing of the run is committed."""


class CommitUnknown(SpamrayError, RuntimeError):
    """A commit whose outcome could not be read back: nothing of it may be deleted."""


# What a run that does not know whether its commit landed tells the user.
UNKNOWN_NEXT = ("this run's files are kept: if the commit landed, the next run finds these inputs scored; if not, it "
                "scores them again (and `spamray vacuum` deletes the files no version names)")


class ScoresTable:
    def __init__(self, url: str):
        self.fs, self.path = storage.url_to_fs(str(url).rstrip("/"))
        self.local = storage.is_local(url)
        if self.local:  # one table, however its path is spelled
            self.path = os.path.normpath(self.path)
        self.url = self.path if self.local else self.fs.unstrip_protocol(self.path)

    # -- reading the log --------------------------------------------------------------------
    def read_state(self) -> TableState:
        from deltalake import DeltaTable

        if not self.has_log():
            self._refuse_other_content()
            return TableState(version=None)
        table = DeltaTable(self.url)
        columns = {f["name"]: json.dumps(f["type"]) for f in json.loads(table.schema().to_json())["fields"]}
        if table.metadata().partition_columns != list(PARTITIONS) or any(name not in columns for name in IDENTITY):
            raise ValueError(f"{self.url} is a Delta table but not a spamray scores table (partitioned by "
                             f"{', '.join(PARTITIONS)}, with the columns {', '.join(IDENTITY)}); choose another "
                             "--output")
        state = TableState(version=table.version(), columns=columns, schema=pa.schema(table.schema().to_arrow()),
                           delta=table)
        for file in self._live_files(table):
            key, scoring = file["partition.input_key"], file["partition.scoring"]
            digest, run_id = scoring.split("-", 1)
            scored = state.inputs.setdefault(key, ScoredInput(digest, run_id))
            if scored.scoring != scoring:
                raise TableError(f"{self.url} holds two scorings of one input (folder input_key={key}: "
                                   f"{scored.scoring} and {scoring}); the table was changed outside spamray: remove "
                                   "one of them before scoring")
            scored.rows += file["num_records"] or 0
            scored.files[file["path"]] = file["size_bytes"]
        return state

    def has_log(self) -> bool:
        """Whether a transaction log is here. Read by listing it, so that a store error is an
        error (deltalake's is_deltatable answers False to one, as for a folder with no table)."""
        try:
            entries = self.fs.ls(f"{self.path}/_delta_log", detail=False)
        except FileNotFoundError:
            return False
        return any(entry.endswith(".json") or ".checkpoint." in entry for entry in entries)

    @staticmethod
    def _live_files(table) -> list[dict]:
        """The log's add actions, paths decoded: the log stores them URL-encoded, and a path is
        used both to open the file and to name it in a RemoveAction (which delta-rs encodes)."""
        files = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        return [{**file, "path": unquote(file["path"])} for file in files]

    def read(self, version: int | None = None, columns: list[str] | None = None,
             runs: set[str] | None = None, delta=None) -> pa.Table:
        """The table's rows at `version` (default: the latest), partition columns included; only
        `columns` where given (the others are not read), only the rows of `runs` (run ids) where
        given (the other files are not opened). Its files are read several at once. `delta`: the
        table's log already loaded (a deltalake DeltaTable), not to load it again.

        It reads the files the log names with pyarrow: deltalake's own scanner can abort the
        process at exit after a successful read (delta-rs #2184), and a scheduler must be able
        to trust exit codes. Other engines read the table as any Delta table."""
        from deltalake import DeltaTable

        table = delta if delta is not None else DeltaTable(self.url, version=version)
        schema = pa.schema(table.schema().to_arrow())
        if columns is not None:
            unknown = sorted(set(columns) - set(schema.names))
            if unknown:
                raise ValueError(f"{self.url} has no column(s) {unknown}; its columns are {schema.names}")
            schema = pa.schema([schema.field(name) for name in columns])
        stored = [name for name in schema.names if name not in PARTITIONS]

        def read_file(file: dict) -> pa.Table:
            with self.fs.open(f"{self.path}/{file['path']}", "rb") as handle:
                part = pq.read_table(handle, columns=stored)
            for name in PARTITIONS:
                if name in schema.names:
                    part = part.append_column(name, pa.array([file[f"partition.{name}"]] * part.num_rows, PARTITIONS[name]))
            return part.select(schema.names).cast(schema)

        files = self._live_files(table)
        if runs is not None:  # a file's run is the end of its scoring partition (see scores_layout)
            files = [file for file in files if file["partition.scoring"].split("-", 1)[1] in runs]
        parts = storage.map_requests(read_file, files)
        return pa.concat_tables(parts) if parts else schema.empty_table()

    def _refuse_other_content(self) -> None:
        if not self.fs.exists(self.path) or not self.fs.ls(self.path):
            return
        raise FileExistsError(f"{self.url} exists and is not a Delta table; choose another --output")

    # -- creating ---------------------------------------------------------------------------
    def create(self, schema: pa.Schema) -> None:
        """An empty table with this schema, unless one exists (then its columns must match)."""
        from deltalake import DeltaTable

        try:
            DeltaTable.create(self.url, schema, mode="ignore", partition_by=list(PARTITIONS),
                              name="spamray scores", description="spamray score output: one row per input row")
        except Exception:
            if not self.has_log():  # not a concurrent first run that won the race
                raise

    def check_columns(self, state: TableState, schema: pa.Schema) -> None:
        wanted = delta_columns(schema)
        if state.columns is not None and state.columns != wanted:
            extra = sorted(set(wanted) - set(state.columns))
            lacking = sorted(set(state.columns) - set(wanted))
            retyped = sorted(c for c in set(wanted) & set(state.columns) if wanted[c] != state.columns[c])
            raise ValueError(f"{self.url} has other columns than this run writes (new: {extra}, not written: {lacking}, "
                             f"other type: {retyped}); use the same --id-column/--keep and labels as the table's "
                             "earlier runs, or another --output")

    # -- committing -------------------------------------------------------------------------
    def commit(self, state: TableState, output: RunOutput, schema: pa.Schema, metadata: dict) -> CommitResult:
        """Commits the run's files against `state`, planning again whenever another commit came
        first. Raises TableError when nothing was committed, CommitUnknown when whether the commit
        landed cannot be read back (then nothing of the run may be deleted)."""
        from deltalake.exceptions import CommitFailedError

        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            plan = plan_commit(state, output)
            if not plan.adds and not plan.removes:
                return CommitResult(None, plan, attempt)
            self.check_files_exist(output, plan)
            try:
                self._commit_once(state, output, plan, schema, metadata)
            except CommitFailedError as error:
                landed = self._find_commit_or_unknown(output.run_id, state.version, error)
                if landed is not None:  # reported as failed, but it is in the log
                    return CommitResult(landed, plan, attempt)
                newer = self._read_state_or_unknown(error)
                if newer.version == state.version:
                    raise TableError(f"the commit to {self.url} failed: {error}; nothing was committed, and the next "
                                     "run scores these files again") from error
                logger.info(f"another run committed version {newer.version} of {self.url} first; planning the commit again")
                state = newer
                continue
            except Exception as error:  # a lost connection, a store that failed: did it land?
                landed = self._find_commit_or_unknown(output.run_id, state.version, error)
                if landed is None:  # not yet; a request still under way could land later
                    raise CommitUnknown(f"the commit to {self.url} failed ({last_line(error)}) and is not in the log; "
                                        f"whether it landed is unknown until that request is over; {UNKNOWN_NEXT}") from error
                return CommitResult(landed, plan, attempt)
            return CommitResult(self._confirm_or_unknown(output.run_id, state.version + 1), plan, attempt)
        raise TableError(f"{self.url}: other commits came first {COMMIT_ATTEMPTS} times in a row; nothing was "
                           "committed (are many runs writing this table at once?)")

    def _commit_once(self, state: TableState, output: RunOutput, plan: CommitPlan, schema: pa.Schema,
                     metadata: dict) -> None:
        from deltalake import DeltaTable
        from deltalake.transaction import AddAction, CommitProperties, RemoveAction

        now = int(time.time() * 1000)
        actions = []
        for url in plan.adds:
            values = partition_values(output.inputs[url], output.model_version, output.run_id)
            actions += [AddAction(f.path, f.bytes, values, now, True, f.stats) for f in output.files[url]]
        removed_from = {path: key for key, scored in state.inputs.items() for path in scored.files}
        for path, size in plan.removes.items():
            scored = state.inputs[removed_from[path]]
            values = {"input_key": removed_from[path], "scoring": scored.scoring}
            actions.append(RemoveAction(path, True, now, size=size, partition_values=values))
        table = state.delta if state.delta is not None else DeltaTable(self.url, version=state.version)
        # No retries inside delta-rs: on any newer commit this fails, and `commit` plans again.
        table.create_write_transaction(actions, mode="append", schema=schema, partition_by=list(PARTITIONS),
                                       commit_properties=CommitProperties(custom_metadata=metadata, max_commit_retries=0))

    def check_files_exist(self, output: RunOutput, plan: CommitPlan) -> None:
        """Right before the commit: every file it adds is there, with the size it will record
        (a full vacuum run by hand at too short a retention could have taken it)."""
        def size(path: str) -> int | None:
            try:
                return self.fs.size(f"{self.path}/{path}")
            except FileNotFoundError:
                return None

        files = [(url, file) for url in plan.adds for file in output.files[url]]
        try:
            sizes = storage.map_requests(size, [file.path for _, file in files])
        except Exception as error:
            raise TableError(f"checking this run's files in {self.url} before the commit failed ({last_line(error)}); "
                             "nothing was committed, and the next run scores these files again") from error
        for (url, file), found in zip(files, sizes):
            if found != file.bytes:
                raise TableError(f"{self.url}/{file.path}, written by this run for {url}, is gone or changed "
                                 "before the commit (a vacuum with a retention shorter than this run?); nothing "
                                 "was committed")

    def commit_info(self, version: int) -> dict | None:
        """The commitInfo of one version, read from its log file (None: no such version)."""
        try:
            lines = self.fs.cat_file(f"{self.path}/_delta_log/{version:020d}.json").decode().splitlines()
        except FileNotFoundError:
            return None
        actions = [json.loads(line) for line in lines if line.strip()]
        return next((action["commitInfo"] for action in actions if "commitInfo" in action), {})

    def run_of(self, version: int) -> str | None:
        info = self.commit_info(version) or {}
        return json.loads(info.get("spamray", "{}")).get("run_id")

    def confirm_commit(self, run_id: str, version: int) -> int:
        """The version a commit claimed holds this run's commit: a store that ignored the
        conditional write would otherwise have let another commit replace it silently."""
        if self.run_of(version) != run_id:
            landed = self.find_commit(run_id, after=version - 1)
            if landed is None:
                raise CommitUnknown(f"the commit to {self.url} was reported as version {version}, but that version is "
                                    f"another commit and this run's is nowhere in the log (does the store honour "
                                    "conditional writes?); nothing of this run is committed")
            return landed
        return version

    def _confirm_or_unknown(self, run_id: str, version: int) -> int:
        try:
            return self.confirm_commit(run_id, version)
        except CommitUnknown:
            raise
        except Exception as error:
            raise CommitUnknown(f"the commit to {self.url} was reported as version {version}, but reading it back "
                                f"failed ({last_line(error)}): whether it landed is unknown; {UNKNOWN_NEXT}") from error

    def find_commit(self, run_id: str, after: int | None) -> int | None:
        """The version after `after` whose commit is this run's, if any."""
        version = 0 if after is None else after + 1
        while (info := self.commit_info(version)) is not None:
            if json.loads(info.get("spamray", "{}")).get("run_id") == run_id:
                return version
            version += 1
        return None

    def _find_commit_or_unknown(self, run_id: str, after: int | None, error: Exception) -> int | None:
        try:
            return self.find_commit(run_id, after)
        except Exception as reading:
            raise CommitUnknown(f"the commit to {self.url} failed ({last_line(error)}) and the log could not be read "
                                f"back ({last_line(reading)}): whether it landed is unknown; {UNKNOWN_NEXT}") from error

    def _read_state_or_unknown(self, error: Exception) -> TableState:
        try:
            return self.read_state()
        except Exception as reading:
            raise CommitUnknown(f"the commit to {self.url} failed ({last_line(error)}) and the table could not be read "
                                f"back ({last_line(reading)}): whether it landed is unknown; {UNKNOWN_NEXT}") from error

    # -- files ------------------------------------------------------------------------------
    def files_in(self, folders: list[str]) -> list[str]:
        """Every data file under these partition folders (paths relative to the table)."""
        listed = storage.map_requests(lambda folder: self.fs.find(f"{self.path}/{folder}"), folders)
        return [path[len(self.path) + 1:] for paths in listed for path in paths if path.endswith(".parquet")]

    def delete(self, paths: list[str]) -> None:
        if paths:
            self.fs.rm([f"{self.path}/{path}" for path in paths])

    def vacuum_removed(self, retention_hours: float) -> list[str]:
        """Deletes the files that commits removed (replaced scorings, compacted files) once older
        than the retention. Never a file no commit has named yet: a running run's are such."""
        from deltalake import DeltaTable

        return DeltaTable(self.url).vacuum(retention_hours=math.ceil(retention_hours), dry_run=False,
                                           enforce_retention_duration=False, full=False)

    def vacuum_unnamed(self, retention_hours: float) -> list[str]:
        """Deletes every file that no version names (a killed run's, and removed ones) once older
        than the retention. A run's files are unnamed until it commits, so a retention shorter
        than the longest run deletes files a running run will commit: refused under
        MIN_FULL_VACUUM_HOURS."""
        from deltalake import DeltaTable

        if retention_hours < MIN_FULL_VACUUM_HOURS:
            raise ValueError(f"a full vacuum deletes the files of runs still scoring; its retention must be at least "
                             f"{MIN_FULL_VACUUM_HOURS:g} hours (and longer than your longest run), not {retention_hours:g}")
        return DeltaTable(self.url).vacuum(retention_hours=math.ceil(retention_hours), dry_run=False,
                                           enforce_retention_duration=False, full=True)
