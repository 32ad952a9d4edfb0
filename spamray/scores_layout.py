"""The scores table's layout, and the plan of what a run scores and commits: plain functions and
values, without storage.

Layout. Every row carries what identifies one scoring of one input file as ordinary columns
(IDENTITY: `source_file`, `source_size`, `source_version`, `model_version`, `run_id`), so every
reader gets them from the data itself. The table is partitioned by two short keys made from them
(PARTITIONS), in hive folders that match the log's partition values:

    input_key=<sha256 of source_file, 32 hex>/scoring=<sha256 of size, version, model, 16 hex>-<run id>/part-….parquet

Each folder name is ASCII of fixed length whatever the input URL (no escaping, never near the
255-byte limit), each data file holds rows of one input scored once, and Delta's own compaction
and Z-ordering, which rewrite files within a partition, keep it so. The transaction log is the
record of what has been scored: its partition values and row counts, committed with the rows,
read without touching any data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pyarrow as pa

from .inputs import InputFile

IDENTITY = {"source_file": pa.string(), "source_size": pa.int64(), "source_version": pa.string(),
            "model_version": pa.string(), "run_id": pa.string()}
PARTITIONS = {"input_key": pa.string(), "scoring": pa.string()}


# -- the layout -----------------------------------------------------------------------------------
def input_key(url: str) -> str:
    """The partition key of an input file: a fixed-length name whatever its URL."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def scoring_digest(size: int, version: str, model_version: str) -> str:
    """What a scoring of an input depends on: its size and version, and the model's version."""
    return hashlib.sha256(json.dumps([size, version, model_version]).encode()).hexdigest()[:16]


def scoring_key(size: int, version: str, model_version: str, run_id: str) -> str:
    return f"{scoring_digest(size, version, model_version)}-{run_id}"


def partition_values(file: InputFile, model_version: str, run_id: str) -> dict[str, str]:
    return {"input_key": input_key(file.url), "scoring": scoring_key(file.size, file.version, model_version, run_id)}


def partition_folder(values: dict[str, str]) -> str:
    return "/".join(f"{name}={values[name]}" for name in PARTITIONS)


def table_schema(data_schema: pa.Schema) -> pa.Schema:
    """The table's columns: the scores, the identity of each row's scoring, the partition keys."""
    return pa.schema([*data_schema, *(pa.field(name, kind) for name, kind in {**IDENTITY, **PARTITIONS}.items())])


def delta_columns(schema: pa.Schema) -> dict[str, str]:
    from deltalake import Schema

    return {f["name"]: json.dumps(f["type"]) for f in json.loads(Schema.from_arrow(schema).to_json())["fields"]}


# -- the record of what is scored ---------------------------------------------------------------------
@dataclass
class ScoredInput:
    """One input file as the log holds it: the scoring its files come from, and the files."""

    digest: str  # scoring_digest of the size, version and model version scored
    run_id: str
    rows: int = 0
    files: dict[str, int] = field(default_factory=dict)  # path in the table (decoded) -> bytes

    @property
    def scoring(self) -> str:
        return f"{self.digest}-{self.run_id}"


@dataclass
class TableState:
    version: int | None  # None: no table yet
    inputs: dict[str, ScoredInput] = field(default_factory=dict)  # input_key -> its scoring
    columns: dict[str, str] | None = None  # column -> Delta type
    schema: pa.Schema | None = None  # the same, as Arrow types
    # The deltalake table read at `version`: a commit planned on this state is made through it,
    # without reading the log again.
    delta: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class WrittenFile:
    path: str  # relative to the table root, decoded
    source_file: str
    rows: int
    bytes: int
    stats: str


@dataclass
class RunOutput:
    """What a run wrote and audited, before its commit."""

    run_id: str
    model_version: str
    mode: str  # "create" (the table must hold no scores), "overwrite" or "incremental"
    inputs: dict[str, InputFile]  # url -> the input as listed
    files: dict[str, list[WrittenFile]]  # url -> its data files
    failed: set[str] = field(default_factory=set)  # urls that failed this run: their old rows stay


@dataclass
class CommitPlan:
    adds: list[str]  # urls whose new files go in
    removes: dict[str, int]  # paths (-> bytes) of the files they replace
    already_scored: list[str]  # urls another run committed the same way meanwhile


@dataclass
class CommitResult:
    version: int | None  # the table version holding this run's rows (None: nothing committed)
    plan: CommitPlan
    attempts: int


def plan_inputs(state: TableState, files: list[InputFile], model_version: str, mode: str) -> list[InputFile]:
    """The input files this run scores: all of them, or (incremental) those new, changed, or
    scored by another model version."""
    if state.inputs and mode == "create":
        raise FileExistsError("the output already holds scores; pass --overwrite to replace them, or "
                              "--incremental to score only new or changed files")
    if mode != "incremental":
        return files
    return [f for f in files if not is_scored(state, f, model_version)]


def plan_commit(state: TableState, output: RunOutput) -> CommitPlan:
    """What the commit adds and removes against `state`: each input's new files replace all of
    its old ones; an input another run committed the same way meanwhile is dropped."""
    if output.mode == "overwrite":
        kept = {input_key(url) for url in output.failed}
        replaced = [scored for key, scored in state.inputs.items() if key not in kept]
        return CommitPlan(list(output.inputs), {p: size for s in replaced for p, size in s.files.items()}, [])
    if output.mode == "create" and state.inputs:
        raise FileExistsError("another run committed scores to this table while this run was scoring; nothing was "
                              "committed (use --incremental for scheduled runs)")
    done = [url for url, file in output.inputs.items() if is_scored(state, file, output.model_version)]
    adds = [url for url in output.inputs if url not in done]
    removes = {path: size for url in adds for path, size in state.inputs.get(input_key(url), ScoredInput("", "")).files.items()}
    return CommitPlan(adds, removes, done)


def is_scored(state: TableState, file: InputFile, model_version: str) -> bool:
    scored = state.inputs.get(input_key(file.url))
    return scored is not None and scored.digest == scoring_digest(file.size, file.version, model_version)
