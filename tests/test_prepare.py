"""The book's data preparation, and what bad input gets."""

import json
import logging
import zipfile
from importlib import resources

import pandas as pd
import pytest

import spamray
from spamray.config import PrepareConfig
from spamray.prepare import download_uci_collection, prepare, read_labelled


def test_all_messages_are_read_despite_quotes():
    frame = read_labelled("sms")
    assert len(frame) == 5574
    assert frame["label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    assert frame["text"].str.contains('"').sum() == 145


def test_book_procedure_is_reproduced(prepared_sms):
    splits = {name: pd.read_parquet(f"{prepared_sms}/{name}.parquet") for name in ("train", "validation", "test")}
    assert [len(part) for part in splits.values()] == [1045, 149, 300]
    both = pd.concat(splits.values())
    assert both["label"].value_counts().to_dict() == {0: 747, 1: 747}
    assert set(both["label_name"]) == {"not spam", "spam"}
    # The book's first training message, and its longest training example of 120 tokens.
    assert splits["train"]["text"].iloc[0] == "Dude how do you like the buff wind."
    lengths = [len(ids) for ids in spamray.get_tokenizer().encode_batch(splits["train"]["text"].tolist())]
    assert max(lengths) == 120
    # Every message traces back to its line in the collection.
    sms = read_labelled("sms")
    row = splits["test"].iloc[5]
    assert sms.loc[row["source_row"] - 1, "text"] == row["text"]


def test_the_ham_balancing_left_out_is_kept_aside_in_two_halves(prepared_sms):
    # For choosing a spam filter's threshold on one half and measuring its false-positive rate on
    # the other: thousands of legitimate messages, none of them in the book's three splits.
    book = pd.concat(pd.read_parquet(f"{prepared_sms}/{name}.parquet") for name in ("train", "validation", "test"))
    tune, test = (pd.read_parquet(f"{prepared_sms}/{name}.parquet") for name in ("heldout_tune", "heldout_test"))
    assert (len(tune), len(test)) == (2040, 2040) and set(tune["label_name"]) == set(test["label_name"]) == {"not spam"}
    rows = [set(part["source_row"]) for part in (book, tune, test)]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert len(rows[0] | rows[1] | rows[2]) == 5574  # every message is somewhere, once
    counts = json.loads(open(f"{prepared_sms}/labels.json").read())["counts"]
    assert counts["heldout_tune"] == {"not spam": 2040, "spam": 0} and counts["test"] == {"not spam": 149, "spam": 151}


def test_other_label_sets_and_no_balancing(tmp_path):
    rows = [(f"message {i}", ["billing", "account", "other"][i % 3]) for i in range(60)]
    pd.DataFrame(rows, columns=["body", "topic"]).to_csv(tmp_path / "in.csv", index=False)
    counts = prepare(PrepareConfig(output=str(tmp_path / "out"), input=str(tmp_path / "in.csv"), text_column="body",
                                   label_column="topic", balance="none"))
    assert list(counts["train"]) == ["account", "billing", "other"]  # sorted: a stable, documented order
    assert sum(sum(c.values()) for c in counts.values()) == 60
    counts = prepare(PrepareConfig(output=str(tmp_path / "out2"), input=str(tmp_path / "in.csv"), text_column="body",
                                   label_column="topic", labels="other,billing,account"))
    assert list(counts["train"]) == ["other", "billing", "account"]


def test_uci_zip_is_checked(tmp_path, monkeypatch):
    data = (resources.files("spamray") / "data" / "SMSSpamCollection").read_bytes()
    for name, content in (("good.zip", data), ("bad.zip", data + b"ham\textra line\n")):
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            archive.writestr("SMSSpamCollection", content)
    assert len(download_uci_collection(f"file://{tmp_path / 'good.zip'}")) == 5574
    with pytest.raises(ValueError, match="expected sha256"):
        download_uci_collection(f"file://{tmp_path / 'bad.zip'}")


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize("name, content, options, message", [
    ("missing.csv", "body,label\nhi,ham\n", {}, "has no column 'text'; its columns are \\['body', 'label'\\]"),
    ("empty.csv", "", {}, "is empty"),
    ("header.csv", "text,label\n", {}, "has a header but no rows"),
    ("unknown.csv", "text,label\n" + "a,ham\nb,spam\n" * 20 + "c,eggs\n", {"labels": "ham,spam"},
     "1 rows cannot be used \\(row 41: unknown label 'eggs'\\)"),
    ("blank.csv", "text,label\n" + "a,ham\nb,spam\n" * 20 + " ,spam\n", {}, "row 41: empty text"),
    ("oneclass.csv", "text,label\n" + "a,ham\n" * 30 + "b,spam\n", {"balance": "none"}, "split has no \\['spam'\\]"),
])
def test_bad_input_gets_a_clear_error(tmp_path, name, content, options, message):
    cfg = PrepareConfig(output=str(tmp_path / "out"), input=write(tmp_path, name, content), **options)
    with pytest.raises(ValueError, match=message):
        prepare(cfg)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_skipping_bad_rows_reports_each(tmp_path, caplog):
    content = "text,label\n" + "a,ham\nb,spam\n" * 20 + "c,eggs\n,ham\n"
    with caplog.at_level(logging.INFO, logger="spamray"):
        prepare(PrepareConfig(output=str(tmp_path / "out"), input=write(tmp_path, "in.csv", content), labels="ham,spam",
                              skip_bad_rows=True))
    dropped = [r for r in caplog.records if r.name == "spamray.prepare" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in dropped] == ["dropped 2 rows: row 41: unknown label 'eggs'; row 42: empty text"]


def test_missing_input_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(PrepareConfig(output=str(tmp_path / "o"), input=str(tmp_path / "nope.csv")))


def test_existing_output_needs_overwrite(prepared_sms):
    with pytest.raises(FileExistsError, match="already exists"):
        prepare(PrepareConfig(output=prepared_sms))


def test_a_labelled_tsv_is_read_as_tsv_is_written_unless_quoting_is_asked_for(tmp_path):
    # A message that begins with a quote stays one row, as in the SMS Spam Collection itself.
    quote = '"'
    lines = ["text\tlabel"] + [f"{quote if i == 3 else ''}message {i}\t{['ham', 'spam'][i % 2]}" for i in range(40)]
    (tmp_path / "in.tsv").write_text("\n".join(lines) + "\n")
    frame = read_labelled(str(tmp_path / "in.tsv"))
    assert len(frame) == 40 and frame["text"][3] == '"message 3'
    (tmp_path / "quoted.tsv").write_text('text\tlabel\n"two\ttabs\there"\tspam\nplain\tham\n')
    quoted = read_labelled(str(tmp_path / "quoted.tsv"), quoted_tsv=True)
    assert quoted["text"].tolist() == ["two\ttabs\there", "plain"]
    with pytest.raises(ValueError, match=r"quoted.tsv: data row 1 \(line 2\) has 4 fields, the header 2"):
        read_labelled(str(tmp_path / "quoted.tsv"))
