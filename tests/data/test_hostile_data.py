"""Hostile data files: each is one DataError naming the file (and line / byte offset where there is one), read in
time and memory linear in the file, or read correctly; never a RecursionError, UnicodeDecodeError or csv.Error.

Covered: invalid UTF-8, a 10 MB line (JSON Lines and JSON read it; CSV refuses its 10 MB cell by name), 100,000
nested brackets, a number of 5,000 digits, NUL bytes (a binary or UTF-16 file), an empty file, a directory.
"""

from __future__ import annotations

import json
import resource

import pytest
from hostile_inputs import ALPACA, time_limit, write_data

from qlora.data import DataError, read_any, validate_alpaca

KINDS = [".json", ".jsonl", ".csv", ".tsv"]


def read(path):
    with time_limit(60):
        return read_any(path)


@pytest.mark.parametrize("suffix", KINDS)
def test_the_undamaged_files_read(tmp_path, suffix):
    """Negative control: every case below damages one of these."""
    records = read(write_data(tmp_path / f"d{suffix}"))
    assert [validate_alpaca(r) for r in records] == ALPACA


@pytest.mark.parametrize("suffix", KINDS + [".txt"])
def test_invalid_utf8_names_file_line_and_offset(tmp_path, suffix):
    path = write_data(tmp_path / f"d{suffix}") if suffix != ".txt" else tmp_path / "d.txt"
    data = path.read_bytes() if suffix != ".txt" else b"line one\nline two\n"
    offset = data.index(b"\n", data.index(b"\n") + 1) - 2  # inside the second line
    path.write_bytes(data[:offset] + b"\xc3\x28" + data[offset + 2 :])
    with pytest.raises(DataError) as caught:
        read(path)
    err = caught.value
    assert (err.path, err.line) == (str(path), 2)
    assert f"invalid UTF-8 (byte 0xc3 at file offset {offset})" in str(err)


@pytest.mark.parametrize("suffix", KINDS + [".txt"])
def test_nul_bytes_are_refused_with_their_offset(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"instruction\0,\0o\0u\0t\0p\0u\0t\0\n")  # what UTF-16 looks like read as UTF-8
    with pytest.raises(DataError, match=r"NUL byte at file offset 11: this is not a text file") as caught:
        read(path)
    assert (caught.value.path, caught.value.line) == (str(path), 1)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deeply_nested_json_is_a_data_error_with_the_line(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    nested = "[" * 100_000 + "]" * 100_000
    if suffix == ".jsonl":
        path.write_text(json.dumps(ALPACA[0]) + "\n" + nested + "\n")
    else:
        path.write_text("[\n" + json.dumps(ALPACA[0]) + ",\n" + nested + "\n]")
    with pytest.raises(DataError, match="nested too deeply") as caught:
        read(path)
    assert (caught.value.path, caught.value.line) == (str(path), 2 if suffix == ".jsonl" else 3)
    assert caught.value.index == (None if suffix == ".jsonl" else 1)


def test_a_number_of_thousands_of_digits(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "x", "output": "y", "id": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match="more digits than Python reads") as caught:
        read(path)
    assert caught.value.line == 1


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_10mb_line_reads_in_linear_time_and_memory(tmp_path, suffix):
    long = "x" * 10_000_000
    records = [ALPACA[0], {"instruction": long, "input": "", "output": "y"}, ALPACA[1]]
    path = write_data(tmp_path / f"d{suffix}", records)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = read(path)
    assert [r.line for r in got][1:] == ([2, 3] if suffix == ".jsonl" else [7, 12])  # json.dumps indent=1
    assert validate_alpaca(got[1])["instruction"] == long
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # ru_maxrss: KiB on Linux
    assert grown < 30 * 10_000_000  # the bytes, the text, a copy or two: a small multiple of the file


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_a_10mb_csv_cell_is_a_clear_error(tmp_path, suffix):
    long = {"instruction": "x" * 10_000_000, "input": "", "output": "y"}
    path = write_data(tmp_path / f"d{suffix}", [ALPACA[0], long])  # the long cell is on line 3
    with pytest.raises(DataError, match=r"longer than Python's csv reader takes \(131,072 characters\)") as caught:
        read(path)
    assert (caught.value.path, caught.value.line) == (str(path), 3)
    assert "JSON Lines" in str(caught.value)


@pytest.mark.parametrize("suffix", KINDS + [".txt"])
def test_an_empty_file(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"the file (is empty|holds no records)") as caught:
        read(path)
    assert caught.value.path == str(path)


@pytest.mark.parametrize("suffix", KINDS + [".txt", ".parquet"])
def test_a_directory_is_not_a_data_file(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    path.mkdir()
    with pytest.raises(DataError, match="is a directory, not a data file") as caught:
        read(path)
    assert caught.value.path == str(path)
