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


def test_a_refused_call_removes_only_what_it_made_in_a_new_folder(tmp_path):
    from cardiomotion.fileio import removed_if_refused

    # a new folder, refused: gone, whatever the body wrote into it
    out = tmp_path / "new"
    with pytest.raises(InputError), removed_if_refused(out, "stage") as held:
        assert held == out.resolve()
        (out / "sub").mkdir(parents=True)
        (out / "sub" / "f").write_text("x")
        raise InputError(out, "refused")
    assert not out.exists()
    # a folder that was there before: kept as it was
    old = tmp_path / "old"
    old.mkdir()
    with pytest.raises(InputError), removed_if_refused(old, "stage"):
        (old / "f").write_text("x")
        raise InputError(old, "refused")
    assert (old / "f").read_text() == "x"
    # only the paths named: another writer's file in the new folder keeps it (and itself)
    out2 = tmp_path / "new2"
    with pytest.raises(InputError), removed_if_refused(out2, "stage", lambda o: (o / "made", o / "made.lock")):
        (out2 / "made").mkdir(parents=True)
        (out2 / "made.lock").write_text("")
        (out2 / "theirs").write_text("y")
        raise InputError(out2, "refused")
    assert sorted(p.name for p in out2.iterdir()) == ["theirs"]
    # a failure that is not a refusal keeps what was finished (a rerun resumes)
    out3 = tmp_path / "new3"
    with pytest.raises(OSError), removed_if_refused(out3, "stage"):
        out3.mkdir()
        (out3 / "done").write_text("z")
        raise OSError("disk full")
    assert (out3 / "done").read_text() == "z"
    # the folder's lock is held inside: a second call of the same stage is refused
    with removed_if_refused(tmp_path / "busy", "stage"), pytest.raises(InputError, match="another `stage`"):
        with removed_if_refused(tmp_path / "busy", "stage"):
            pass
