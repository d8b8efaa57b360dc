"""Append-only JSON-lines results files survive a writer killed mid-append."""
from __future__ import annotations

import json

import pytest

from cardiomotion.errors import InputError
from cardiomotion.fileio import append_json_lines, read_json_lines


def test_a_truncated_last_line_is_dropped_and_appends_stay_valid(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"arm": "cvae", "n": 64}\n{"arm": "random", "n"')
    said: list[str] = []
    assert read_json_lines(path, log=said.append) == [{"arm": "cvae", "n": 64}]
    assert len(said) == 1 and "runs.jsonl: line 2 is truncated" in said[0]
    append_json_lines(path, [{"arm": "random", "n": 64}])
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"arm": "cvae", "n": 64}, {"arm": "random", "n": 64}]


def test_a_line_cut_before_its_newline_does_not_swallow_the_next_row(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}')  # complete JSON, newline never written
    append_json_lines(path, [{"c": 3}, {"d": 4}])
    assert read_json_lines(path) == [{"a": 1}, {"b": 2}, {"c": 3}, {"d": 4}]


def test_damage_before_the_last_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(InputError, match=r"runs.jsonl: line 2 is not JSON"):
        read_json_lines(path)
    assert path.read_text() == '{"a": 1}\nnot json\n{"b": 2}\n'  # damage is reported, never rewritten
    assert read_json_lines(tmp_path / "absent.jsonl") == []
