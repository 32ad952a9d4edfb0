"""Data preparation, the book's way: read labelled messages, map labels to ids, balance, split.

Book procedure (chapter 6): `ham` undersampled to the 747 `spam` messages with
random_state=123, the balanced frame shuffled with random_state=123, then sliced 70/10/20.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

import pandas as pd
import pyarrow as pa

from . import delimited, storage
from .config import PrepareConfig
from .errors import SpamrayError
from .operating_point import default_positive

UCI_ZIP_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"

logger = logging.getLogger(__name__)
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
SPLITS = ("train", "validation", "test")
# The rows balancing left out (for the SMS collection: 4,080 of the 4,827 ham), halved: a spam
# filter's threshold is chosen on the first and its false-positive rate measured on the second,
# on thousands of legitimate messages rather than the test split's 149.
HELDOUT_SPLITS = ("heldout_tune", "heldout_test")
LABELS_FILE = "labels.json"
# The SMS collection's labels read better as a classifier's answers.
SMS_LABEL_NAMES = {"ham": "not spam", "spam": "spam"}


# -- reading ---------------------------------------------------------------------------------
def read_sms_collection(data: bytes, where: str) -> pd.DataFrame:
    """The SMS Spam Collection's `label<TAB>text` lines; quoting off, so all 5,574 rows come through."""
    frame = pd.read_csv(io.BytesIO(data), sep="\t", header=None, names=["label", "text"], dtype=str,
                        quoting=csv.QUOTE_NONE, keep_default_na=False, encoding="utf-8")
    if frame.empty:
        raise ValueError(f"{where} has no messages")
    return frame


def shipped_sms_collection() -> pd.DataFrame:
    data = (resources.files("spamray") / "data" / "SMSSpamCollection").read_bytes()
    return read_sms_collection(data, "the shipped SMSSpamCollection")


def download_uci_collection(url: str = UCI_ZIP_URL) -> pd.DataFrame:
    try:
        archive = zipfile.ZipFile(io.BytesIO(storage.read_bytes(url)))
        data = archive.read("SMSSpamCollection")
    except Exception as error:
        raise SpamrayError(f"could not download the SMS Spam Collection from {url} ({error}); "
                           "use --input sms for the copy shipped with spamray") from error
    if hashlib.sha256(data).hexdigest() != SMS_SHA256:
        raise ValueError(f"SMSSpamCollection from {url} does not have the expected sha256 {SMS_SHA256}")
    return read_sms_collection(data, url)


def read_table(url: str, columns: list[str], quoted_tsv: bool = False) -> pd.DataFrame:
    """A labelled TSV/CSV/Parquet file with a header, as strings; every named column must exist."""
    name = url.rstrip("/").rsplit("/", 1)[-1].lower()
    if not storage.exists(url):
        raise FileNotFoundError(f"{url} does not exist")
    if name.endswith((".parquet", ".pq")):
        frame = pd.read_parquet(url)
    else:
        frame = read_delimited(url, "csv" if name.endswith(".csv") else "tsv", quoted_tsv)
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{url} has no column {missing[0]!r}; its columns are {list(frame.columns)}. "
                         "Name the right ones with --text-column / --label-column.")
    if frame.empty:
        raise ValueError(f"{url} has a header but no rows")
    return frame[columns].rename(columns={columns[0]: "text", columns[1]: "label"})


def read_delimited(url: str, kind: str, quoted_tsv: bool) -> pd.DataFrame:
    """Every column of a CSV/TSV file as strings, read strictly: a row that cannot be told from
    the next fails the file, named."""
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as handle:
        try:
            names = delimited.header(handle, kind, quoted_tsv)
            handle.seek(0)
            parts = list(delimited.batches(handle, kind, names, 1 << 16, quoted_tsv=quoted_tsv))
        except delimited.EmptyFile:
            raise ValueError(f"{url} is empty: expected a header line and at least one row") from None
        except delimited.RowError as error:
            raise ValueError(f"{url}: {error}") from None
    return pa.concat_tables(parts).to_pandas() if parts else pd.DataFrame(columns=names)


def read_labelled(source: str, text_column: str = "text", label_column: str = "label",
                  quoted_tsv: bool = False) -> pd.DataFrame:
    """Columns `text`, `label` (as in the file) and `source_row` (1-based data row number)."""
    if source == "sms":
        frame = shipped_sms_collection()
    elif source == "uci":
        frame = download_uci_collection()
    elif source.rstrip("/").endswith("SMSSpamCollection"):
        frame = read_sms_collection(storage.read_bytes(source), source)
    else:
        frame = read_table(source, [text_column, label_column], quoted_tsv)
    frame = frame.reset_index(drop=True)
    frame["text"] = frame["text"].astype(object)
    frame["label"] = frame["label"].astype(str)
    frame["source_row"] = range(1, len(frame) + 1)
    return frame[["text", "label", "source_row"]]


# -- labels ----------------------------------------------------------------------------------
def label_order(raw_labels: pd.Series, labels_option: str | None) -> tuple[list[str], list[str]]:
    """(values as they appear in the file, in id order; the label names a classifier reports)."""
    if labels_option:
        values = [value.strip() for value in labels_option.split(",") if value.strip()]
        return values, values
    present = set(raw_labels)
    if present == set(SMS_LABEL_NAMES):
        return list(SMS_LABEL_NAMES), list(SMS_LABEL_NAMES.values())
    values = sorted(present)
    return values, values


def positive_label(names: list[str], label_ids: pd.Series, chosen: str | None) -> str | None:
    """The class a binary classifier flags: `chosen` (--positive-label), else 'spam' where it is
    a label, else the class with fewer rows (a tie: the second). None for other label sets."""
    if chosen is not None:
        if len(names) != 2 or chosen not in names:
            raise ValueError(f"--positive-label {chosen!r} must be one of two labels; the labels are {names}")
        return chosen
    if len(names) != 2:
        return None
    if "spam" in names:
        return "spam"
    counts = label_ids.value_counts()
    return names[min((1, 0), key=lambda i: counts.get(i, 0))]


def bad_rows(frame: pd.DataFrame, values: list[str]) -> pd.Series:
    """Reasons keyed by row for rows that cannot be used: empty text or a label outside `values`."""
    reasons = pd.Series("", index=frame.index)
    empty = frame["text"].map(lambda text: not isinstance(text, str) or not text.strip())
    reasons[empty] = "empty text"
    unknown = ~frame["label"].isin(values)
    reasons[unknown] = "unknown label " + frame.loc[unknown, "label"].map(repr)
    return reasons[reasons != ""]


def describe_rows(frame: pd.DataFrame, reasons: pd.Series, limit: int = 10) -> str:
    shown = [f"row {frame.at[index, 'source_row']}: {reason}" for index, reason in reasons.head(limit).items()]
    more = f" and {len(reasons) - limit} more" if len(reasons) > limit else ""
    return "; ".join(shown) + more


# -- the book's procedure --------------------------------------------------------------------
def balance(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Each class sampled down to the size of the smallest (the smallest kept as it is), in id order."""
    smallest = frame["label"].value_counts().min()
    parts = []
    for label_id in sorted(frame["label"].unique()):
        members = frame[frame["label"] == label_id]
        parts.append(members if len(members) == smallest else members.sample(smallest, random_state=seed))
    return pd.concat(parts)


def split(frame: pd.DataFrame, train_fraction: float, validation_fraction: float, seed: int) -> dict[str, pd.DataFrame]:
    shuffled = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(shuffled) * train_fraction)
    validation_end = train_end + int(len(shuffled) * validation_fraction)
    return {"train": shuffled[:train_end], "validation": shuffled[train_end:validation_end], "test": shuffled[validation_end:]}


def prepare(cfg: PrepareConfig) -> dict:
    """Reads, checks, balances and splits `cfg.input`; writes the splits; returns the counts."""
    frame = read_labelled(cfg.input, cfg.text_column, cfg.label_column, cfg.quoted_tsv)
    values, names = label_order(frame["label"], cfg.labels)
    problems = bad_rows(frame, values)
    if len(problems) and not cfg.skip_bad_rows:
        raise ValueError(f"{cfg.input}: {len(problems)} rows cannot be used ({describe_rows(frame, problems)}). "
                         "Fix them, name the labels with --labels, or pass --skip-bad-rows to drop them.")
    if len(problems):
        logger.warning(f"dropped {len(problems)} rows: {describe_rows(frame, problems, limit=len(problems))}")
        frame = frame.drop(index=problems.index)
    frame = frame.assign(label=frame["label"].map({value: i for i, value in enumerate(values)}).astype("int64"))
    positive = positive_label(names, frame["label"], cfg.positive_label)
    left_out = frame.iloc[0:0]
    if cfg.balance == "undersample":
        balanced = balance(frame, cfg.seed)
        frame, left_out = balanced, frame.drop(index=balanced.index)
    splits = split(frame, cfg.train_fraction, cfg.validation_fraction, cfg.seed)
    if len(left_out):
        splits.update(halve(left_out, cfg.seed))
    counts = {name: {names[i]: int((part["label"] == i).sum()) for i in range(len(names))} for name, part in splits.items()}
    for name, per_class in [(name, counts[name]) for name in SPLITS]:
        missing = [label for label, count in per_class.items() if count == 0]
        if missing:
            raise ValueError(f"the {name} split has no {missing} messages ({per_class}); a classifier cannot be "
                             "trained or judged on it. Provide more rows of each class.")
    write_prepared(cfg, splits, names, values, counts, positive)
    logger.info(format_counts(counts))
    if positive is not None:
        logger.info(f"positive class (what the filter flags): {positive!r}")
    logger.info(f"prepared data written to {cfg.output}")
    return counts


def halve(rows: pd.DataFrame, seed: int) -> dict[str, pd.DataFrame]:
    """The held-out rows shuffled (seeded) and cut in two: HELDOUT_SPLITS."""
    shuffled = rows.sample(frac=1, random_state=seed).reset_index(drop=True)
    middle = len(shuffled) // 2
    return dict(zip(HELDOUT_SPLITS, (shuffled[:middle], shuffled[middle:])))


def write_prepared(cfg: PrepareConfig, splits: dict[str, pd.DataFrame], names: list[str], values: list[str], counts: dict,
                   positive: str | None) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        for name, part in splits.items():
            part = part.assign(label_name=part["label"].map(dict(enumerate(names))))
            part[["text", "label", "label_name", "source_row"]].to_parquet(Path(scratch) / f"{name}.parquet", index=False)
        record = {"labels": names, "positive": positive, "label_values": values, "counts": counts, "input": cfg.input,
                  "balance": cfg.balance, "seed": cfg.seed}
        (Path(scratch) / LABELS_FILE).write_text(json.dumps(record, indent=2))
        storage.publish_folder(Path(scratch), cfg.output, commit_file=LABELS_FILE, overwrite=cfg.overwrite)


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    labels = list(next(iter(counts.values())))
    lines = [f"{'split':<14}" + "".join(f"{label:>10}" for label in labels) + f"{'total':>10}"]
    for name, per_class in counts.items():
        lines.append(f"{name:<14}" + "".join(f"{per_class[label]:>10}" for label in labels) + f"{sum(per_class.values()):>10}")
    return "\n".join(lines)


# -- reading prepared data -------------------------------------------------------------------
def read_labels_record(data: str) -> dict:
    url = storage.join(data, LABELS_FILE)
    if not storage.exists(url):
        raise FileNotFoundError(f"{data} is not a prepared folder: it has no {LABELS_FILE} (run `spamray prepare`)")
    return json.loads(storage.read_bytes(url))


def read_prepared_labels(data: str) -> list[str]:
    return read_labels_record(data)["labels"]


def read_positive_label(data: str) -> str | None:
    """The positive class of a prepared folder of two labels, as its labels.json records it
    (`default_positive` where it records none); None for other label sets."""
    record = read_labels_record(data)
    return record.get("positive") or default_positive(record["labels"])


def split_url(data: str, split_name: str) -> str:
    if split_name not in SPLITS + HELDOUT_SPLITS:
        raise ValueError(f"unknown split {split_name!r}; choose one of {', '.join(SPLITS + HELDOUT_SPLITS)}")
    return storage.join(data, f"{split_name}.parquet")


def prepared_digest(data: str) -> str:
    """What a prepared folder holds, as one digest: labels.json and every split's file. Prepared
    again into the same folder (another input, label order or seed), it is another dataset."""
    digest = hashlib.sha256()
    for name in (LABELS_FILE, *(f"{split}.parquet" for split in SPLITS + HELDOUT_SPLITS)):
        url = storage.join(data, name)
        if storage.exists(url):
            digest.update(f"{name}\n".encode() + hashlib.sha256(storage.read_bytes(url)).digest())
    return digest.hexdigest()


def has_split(data: str, split_name: str) -> bool:
    """Whether a prepared folder has this split (the held-out ones exist only where balancing
    left rows out)."""
    return storage.exists(split_url(data, split_name))
