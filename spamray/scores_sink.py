"""The scores table as a Ray Data sink: writer tasks write data files, the driver audits and
commits them in one Delta transaction, and a run that fails deletes what it wrote.

    write (in tasks)         -> the data files each task wrote, and the inputs that failed
    on_write_complete (driver) -> empty inputs' files, the audit, one commit, the cleanup
    on_write_failed (driver)   -> the cleanup: this run's files that no commit names

Ray ships a `DeltaDatasink` (`Dataset.write_delta`); spamray's is its own because a scoring run
commits more than appended rows: each input's new files replace its old ones in the same commit,
the commit is planned against the version the run started from and planned again when another
run came first, the rows are proven complete before anything is committed, and inputs fail one
by one. What it keeps of Ray's: hive partition folders, and statistics in every add action.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import Block

from .errors import last_line
from .inputs import InputFile
from .scores_audit import Audit, AuditFailed, audit_written
from .scores_layout import CommitResult, RunOutput, TableState, partition_folder, partition_values, table_schema
from .scores_table import ScoresTable, TableError
from .table_files import write_data_files, write_file, written_files

logger = logging.getLogger(__name__)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


@dataclass
class SinkOutcome:
    """What the driver learnt from the writer tasks and the commit."""

    file_errors: dict[str, str] = field(default_factory=dict)
    replica_nodes: list[str] = field(default_factory=list)
    audit: Audit | None = None
    output: RunOutput | None = None
    committing: bool = False  # the commit was asked for: from then on, only a certain failure deletes files
    result: CommitResult | None = None


class ScoresSink(Datasink):
    def __init__(self, table: ScoresTable, state: TableState, run_id: str, model_version: str, mode: str,
                 data_schema: pa.Schema, inputs: list[InputFile], metadata: dict, rows_per_write: int,
                 rows_written=None, failed_up_front: dict[str, str] | None = None,
                 footer_rows: dict[str, int | None] | None = None):
        self.table, self.state, self.run_id = table, state, run_id
        self.model_version, self.mode, self.data_schema = model_version, mode, data_schema
        self.inputs = {file.url: file for file in inputs}
        self.failed_up_front = dict(failed_up_front or {})  # inputs not scored -> why; an overwrite keeps their rows
        self.footer_rows = footer_rows or {}  # Parquet inputs' rows as the up-front check read them
        self.metadata, self.rows_per_write, self.rows_written = metadata, rows_per_write, rows_written
        self.outcome = SinkOutcome()

    def __getstate__(self) -> dict:
        # The writer tasks need neither the table's record (it grows with the table) nor the outcome.
        return {**self.__dict__, "state": None, "outcome": None, "footer_rows": None}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    def get_name(self) -> str:
        return "ScoresTable"

    # -- in the writer tasks --------------------------------------------------------------------
    def write(self, blocks: Iterable[Block], ctx) -> list[dict]:
        """The task's rows, in files of at most `rows_per_write` rows of one input file each."""
        rows, written = pa.concat_tables([pa.table(block) for block in blocks]), []
        for start in range(0, rows.num_rows, self.rows_per_write):
            files = write_data_files(rows.slice(start, self.rows_per_write), self.table.url, self.run_id,
                                     self.model_version, self.data_schema, self.inputs)
            written += files.to_pylist()
            if self.rows_written is not None:
                self.rows_written.add.remote(sum(files["rows"].to_pylist()))
        return written

    # -- on the driver --------------------------------------------------------------------------
    def on_write_complete(self, write_result) -> None:
        output = self.outcome.output = self.audited_output(write_result)
        audit = self.outcome.audit
        record = {**self.metadata, "run_id": self.run_id, "files_scored": len(output.inputs), "rows": audit.rows_written,
                  "rows_per_status": dict(audit.rows_per_status), "rows_per_label": dict(audit.rows_per_label),
                  "files_failed": {**self.failed_up_front, **self.outcome.file_errors}}
        self.outcome.committing = True
        self.outcome.result = self.table.commit(self.state, output, table_schema(self.data_schema),
                                                {"spamray": json.dumps(record)})
        self.clean_up()

    def audited_output(self, write_result) -> RunOutput:
        """What the run wrote, proven whole input by input: the files to commit. Nothing is
        committed yet, so any failure here leaves the table as it was."""
        rows = [row for task_rows in write_result.write_returns for row in task_rows]
        files, self.outcome.file_errors, self.outcome.replica_nodes = written_files(rows)
        scored = [file for url, file in self.inputs.items() if url not in self.outcome.file_errors]
        try:
            for file in scored:  # an input with no rows still gets its (empty) file: the log records it as scored
                if file.url not in files:
                    files[file.url] = [write_file(self.table.fs, self.table.path, self.data_schema.empty_table(), file,
                                                  self.model_version, self.run_id)]
            audit = self.outcome.audit = audit_written(self.table.fs, self.table.path, files, scored,
                                                       footer_rows=self.footer_rows)
        except AuditFailed:
            raise
        except Exception as error:
            raise TableError(f"reading back this run's files in {self.table.url} failed ({last_line(error)}); nothing "
                             "was committed, and the next run scores these files again") from error
        self.outcome.file_errors.update(audit.file_errors)
        scored = [file for file in scored if file.url not in audit.file_errors]
        return RunOutput(self.run_id, self.model_version, self.mode, {f.url: f for f in scored},
                         {f.url: files[f.url] for f in scored},
                         failed=set(self.outcome.file_errors) | set(self.failed_up_front))

    def on_write_failed(self, error: Exception) -> None:
        """Deletes this run's files where nothing of it is committed; keeps them where a commit
        was under way and did not end in a certain failure (it may have landed)."""
        if self.outcome.committing and self.outcome.result is None and not isinstance(error, TableError):
            logger.warning(f"this run's files in {self.table.url} are kept: whether its commit landed is unknown")
            return
        self.clean_up()

    def clean_up(self) -> None:
        """Deletes the files this run wrote and did not commit (all of them if it failed; those
        of failed inputs, of retried tasks, of inputs another run committed first): nothing will
        read them. Only this run's partition folders are looked at, never another run's file."""
        result, output = self.outcome.result, self.outcome.output
        committed = set()
        if result is not None and result.version is not None:
            committed = {f.path for url in result.plan.adds for f in output.files[url]}
        folders = [partition_folder(partition_values(file, self.model_version, self.run_id)) for file in self.inputs.values()]
        try:
            self.table.delete([path for path in self.table.files_in(folders) if path not in committed])
        except Exception as error:  # the outcome stands; the files are unnamed, and a full vacuum takes them
            logger.warning(f"could not delete this run's uncommitted files in {self.table.url}: {error}")
