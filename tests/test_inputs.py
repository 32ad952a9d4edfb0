"""Finding and reading the archive's files: names that look like globs or hidden paths, one folder
spelled two ways, and CSV/TSV files whose quotes would merge rows (read without Ray)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spamray.cli import main
from spamray.inputs import check_inputs, list_input_files, read_chunks
from spamray.scores_table import ScoresTable


def write(path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def read_all(url: str, carried=None, **options) -> pa.Table:
    return pa.concat_tables(list(read_chunks(url, "text", carried or {}, chunk_rows=1000, **options)))


def the_error(table: pa.Table) -> str | None:
    errors = [e for e in table["file_error"].to_pylist() if e]
    return errors[0] if errors else None


# -- CSV and TSV: every row as written, or the file fails naming the row ------------------------
TSV = b'id\ttext\n1\thello\n2\t"Wake up now\n3\tthree\n4\tfour "quoted" word\n5\t"\n'


def test_a_tsv_is_read_as_tsv_is_written_one_line_a_row_quotes_and_all(tmp_path):
    rows = read_all(write(tmp_path / "msgs.tsv", TSV), {"id": pa.string()})
    assert the_error(rows) is None
    assert rows["id"].to_pylist() == ["1", "2", "3", "4", "5"]
    assert rows["text"].to_pylist() == ["hello", '"Wake up now', "three", 'four "quoted" word', '"']
    assert rows["source_row"].to_pylist() == [0, 1, 2, 3, 4]


def test_a_tsv_with_quoted_fields_is_read_so_when_asked(tmp_path):
    tsv = write(tmp_path / "quoted.tsv", b'id\ttext\n1\t"a tab\there and\na line break"\n2\t"say ""hi"""\n')
    rows = read_all(tsv, {"id": pa.string()}, quoted_tsv=True)
    assert rows["text"].to_pylist() == ["a tab\there and\na line break", 'say "hi"'] and the_error(rows) is None
    plain = read_all(tsv, {"id": pa.string()})
    assert "data row 1 (line 2) has 3 fields, the header 2" in the_error(plain)


@pytest.mark.parametrize("content, where, problem", [
    # A quote opened in row 2 and never closed: the reader would take the rest of the file as one message.
    (b'id,text\n1,hello\n2,"Wake up now\n3,three\n4,four\n', "data row 2 (line 3)", "a quoted field is never closed"),
    # Closed, but not at the end of its field: where the row ends cannot be told.
    (b'id,text\n1,hello\n2,"Wake up now\n3,three\n4,"quoted, text"\n', "data row 2 (line 3)", "',' expected after '\"'"),
    (b'id,text\n1,hello\n2,"ab"cd\n', "data row 2 (line 3)", "',' expected after '\"'"),
    (b'id,text\n1,hello\n2,two,fields\n', "data row 2 (line 3) has 3 fields, the header 2", ""),
    (b'id,text\n1,hello\n2\n', "data row 2 (line 3) has 1 fields, the header 2", ""),
])
def test_a_csv_whose_rows_cannot_be_told_apart_fails_naming_the_row(tmp_path, content, where, problem):
    rows = read_all(write(tmp_path / "bad.csv", content), {"id": pa.string()})
    error = the_error(rows)
    assert rows["status"].to_pylist()[-1] == "read_error" and where in error and problem in error, error
    assert rows["source_row"].to_pylist()[-1] == -1


def test_quoted_csv_fields_keep_their_commas_quotes_and_line_breaks_and_bad_bytes_mark_one_row(tmp_path):
    content = b'text,id\n"a, b",1\n"say ""hi""\nand bye",2\n\nplain,3\nbad \xff byte,4\n'
    rows = read_all(write(tmp_path / "ok.csv", content), {"id": pa.string()})
    assert the_error(rows) is None and rows["id"].to_pylist() == ["1", "2", "3", "4"]  # the blank line is no row
    assert rows["text"].to_pylist() == ["a, b", 'say "hi"\nand bye', "plain", None]
    assert rows["status"].to_pylist() == [None, None, None, "undecodable"]


def test_a_carried_column_that_is_not_utf8_fails_its_file_naming_row_and_column(tmp_path):
    rows = read_all(write(tmp_path / "ids.csv", b"text,id\nfine,1\nfine,\xff\n"), {"id": pa.string()})
    assert "data row 2 (line 3): column 'id' is not UTF-8" in the_error(rows)


def test_a_csv_whose_first_row_is_over_a_mebibyte_is_checked_and_read(tmp_path):
    long_text = "word " * 300_000  # 1.5 MB
    csv = write(tmp_path / "long.csv", f"text\n{long_text}\nshort\n")
    files, _ = list_input_files(csv)
    _, unreadable, rows = check_inputs(files, "text", [])
    assert unreadable == {}
    assert read_all(csv)["text"].to_pylist() == [long_text, "short"]


def test_the_check_and_the_reader_see_the_same_columns(tmp_path):
    files, _ = list_input_files(write(tmp_path / "msgs.tsv", TSV))
    types, unreadable, rows = check_inputs(files, "text", ["id"])
    assert unreadable == {} and types == {"id": pa.string()} and rows == {files[0].url: None}
    with pytest.raises(ValueError, match="has no column 'sender'; its columns are \\['id', 'text'\\]"):
        check_inputs(files, "text", ["sender"])


# -- which files a path names ------------------------------------------------------------------
def test_a_file_name_with_brackets_is_that_file_not_a_glob(tmp_path):
    bracketed = write(tmp_path / "in" / "msgs[1].csv", "text\nbracketed\n")
    write(tmp_path / "in" / "msgs1.csv", "text\nother\n")
    assert [f.url for f in list_input_files(bracketed)[0]] == [bracketed]
    globbed = list_input_files(str(tmp_path / "in" / "msgs?.csv"))[0]  # a real glob is still one
    assert [f.url for f in globbed] == [str(tmp_path / "in" / "msgs1.csv")]


@pytest.mark.parametrize("folder", ["_x", ".x"])
def test_a_file_named_explicitly_is_read_whatever_its_folder_is_called(tmp_path, folder):
    named = write(tmp_path / folder / "a.csv", "text\nhi\n")
    assert [f.url for f in list_input_files(named)[0]] == [named]
    assert [f.url for f in list_input_files(str(tmp_path / folder))[0]] == [named]  # as the folder given whole


def test_one_folder_spelled_several_ways_lists_the_same_files(tmp_path, monkeypatch):
    write(tmp_path / "in" / "a.csv", "text\nhi\n")
    monkeypatch.chdir(tmp_path)
    spellings = ["in", "in/", "in//./", "./in/../in", str(tmp_path / "in"), f"file://{tmp_path}/in/"]
    listed = {spelling: [f.url for f in list_input_files(spelling)[0]] for spelling in spellings}
    assert set(map(tuple, listed.values())) == {(str(tmp_path / "in" / "a.csv"),)}, listed


def test_an_incremental_run_given_the_folder_spelled_otherwise_scores_nothing_again(ray_local, model_url, tmp_path,
                                                                                    sms_messages, capsys):
    (tmp_path / "in").mkdir()
    for day in range(2):
        pq.write_table(pa.table({"text": sms_messages[day * 20:(day + 1) * 20]}), tmp_path / "in" / f"day-{day}.parquet")
    out = str(tmp_path / "scores")
    for spelling in [f"{tmp_path}/in/", f"{tmp_path}/in//./"]:
        assert main(["score", "--model", model_url, "--input", spelling, "--output", out, "--incremental"]) == 0
    assert ScoresTable(out).read().num_rows == 40
    assert "nothing new to score" in capsys.readouterr().out


def test_a_tsv_night_commits_every_row_with_its_text(ray_local, model_url, place):
    place.fs.makedirs(f"{place.path}/archive", exist_ok=True)
    place.fs.pipe_file(f"{place.path}/archive/msgs.tsv", TSV)
    out = place.join("scores")
    assert main(["score", "--model", model_url, "--input", place.join("archive"), "--output", out,
                 "--id-column", "id", "--keep", "text"]) == 0
    rows = ScoresTable(out).read().to_pandas().sort_values("source_row")
    assert rows["id"].tolist() == ["1", "2", "3", "4", "5"] and rows["text"].tolist()[1] == '"Wake up now'


def test_quoted_tsv_reaches_the_readers_of_a_scoring_run(ray_local, model_url, tmp_path):
    tsv = write(tmp_path / "in" / "quoted.tsv", b'id\ttext\n1\t"two\ttabs\there"\n2\tplain\n')
    out = str(tmp_path / "scores")
    assert main(["score", "--model", model_url, "--input", tsv, "--output", out, "--keep", "id", "text",
                 "--quoted-tsv"]) == 0
    rows = ScoresTable(out).read().to_pandas().sort_values("source_row")
    assert rows["text"].tolist() == ["two\ttabs\there", "plain"]
