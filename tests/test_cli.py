"""The ``cardiomotion`` command: sub-commands, flags validated like config values, help texts,
and the error contract of a real process (exit 2, one stderr line, no traceback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cardiomotion.cli import build_parser, main
from cardiomotion.data.phantom import make_cohort

SCRIPT = Path(sys.executable).with_name("cardiomotion")
FILES = ("ct.nii.gz", "labels.nii.gz", "truth/flow_ed_from_es.nii.gz", "meta.json")


def _subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sorted(sub.choices)


def test_phantom_command_writes_the_cohort(tmp_path, capsys):
    out = tmp_path / "cohort"
    rc = main(["phantom", "--out", str(out), "--patients", "2", "--grid", "24", "--phases", "3",
               "--seed", "4", "--workers", "1"])
    assert rc == 0
    assert f"wrote 2 phantom patients to {out.resolve()}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["phantom_000", "phantom_001"]
    for folder in out.iterdir():
        assert all((folder / f).is_file() for f in FILES)
        meta = json.loads((folder / "meta.json").read_text())
        assert (meta["seed"], meta["grid"], len(meta["phase_percent"])) == (4, 24, 3)
    # the command writes exactly what the library writes
    lib = make_cohort(tmp_path / "lib", patients=2, grid=24, phases=3, seed=4, workers=1)
    for folder in lib:
        for f in FILES:
            assert (folder / f).read_bytes() == (out / folder.name / f).read_bytes(), f
    # a rerun resumes: nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["phantom", "--out", str(out), "--patients", "2", "--grid", "24", "--phases", "3",
                 "--seed", "4", "--workers", "1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_phantom_flags_override_the_config(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("phantom:\n  patients: 1\n  grid: 16\n  phases: 2\n  seed: 9\n")
    out = tmp_path / "cohort"
    assert main(["phantom", "--out", str(out), "--config", str(cfg), "--grid", "20", "--workers", "1"]) == 0
    meta = json.loads((out / "phantom_000" / "meta.json").read_text())
    assert (meta["grid"], meta["seed"], len(meta["phase_percent"])) == (20, 9, 2)
    assert sorted(p.name for p in out.iterdir()) == ["phantom_000"]


@pytest.mark.parametrize("flags, named", [
    (["--grid", "4"], "phantom.grid"),
    (["--patients", "0"], "phantom.patients"),
    (["--phases", "1"], "phantom.phases"),
    (["--spacing", "-1"], "phantom.spacing_mm"),
    (["--workers", "0"], "--workers"),
])
@pytest.mark.parametrize("with_config", [False, True])
def test_phantom_refuses_impossible_flags(flags, named, with_config, tmp_path, capsys):
    """Flags are validated like config values; the message blames the flag, not a good file."""
    out = tmp_path / "cohort"
    cfg = tmp_path / "fine.yaml"
    cfg.write_text("phantom:\n  grid: 32\n")
    rc = main(["phantom", "--out", str(out), *flags] + (["--config", str(cfg)] if with_config else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert "fine.yaml" not in err[0]
    if named.startswith("phantom."):
        assert err[0].startswith(f"error: command line: {named}: ")
    assert not out.exists()


def test_phantom_blames_a_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("phantom:\n  grid: 4\n")
    rc = main(["phantom", "--out", str(tmp_path / "c"), "--grid", "32", "--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {cfg}: phantom.grid: "), err


def test_phantom_refuses_a_cohort_of_another_seed(tmp_path, capsys):
    out = tmp_path / "cohort"
    args = ["phantom", "--out", str(out), "--patients", "1", "--grid", "16", "--phases", "2", "--workers", "1"]
    assert main(args + ["--seed", "1"]) == 0
    capsys.readouterr()
    assert main(args + ["--seed", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "phantom_000" in err[0] and "seed" in err[0]


def test_file_system_errors_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = main(["phantom", "--out", str(blocker / "cohort"), "--patients", "1", "--grid", "16",
               "--phases", "2", "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "a_file" in err[0], err


def test_every_subcommand_has_help(capsys):
    commands = _subcommands()
    assert {"phantom", "prepare", "demo"} <= set(commands)
    for cmd in commands:
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: cardiomotion {cmd}") and "--config" in out
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in commands)
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("cardiomotion ")


def test_usage_errors_exit_2_in_one_line_naming_the_command(capsys):
    for argv, command, problem in (([], "cardiomotion", "the following arguments are required: COMMAND"),
                                   (["nonsense"], "cardiomotion", "invalid choice: 'nonsense'"),
                                   (["prepare", "--out", "x"], "cardiomotion prepare",
                                    "the following arguments are required: --scans"),
                                   (["generate", "--n", "many"], "cardiomotion generate", "invalid int value: 'many'")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.endswith("\n") and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {command}: ") and problem in err and f"`{command} --help`" in err, err


def test_real_process_bad_input_exit_2_one_line(tmp_path):
    """The installed console script, as a user runs it: bad input → exit 2, one stderr line
    naming the file and the problem, no traceback, nothing written."""
    assert SCRIPT.is_file(), SCRIPT
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    out = tmp_path / "out"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([str(SCRIPT), "prepare", "--scans", str(notes), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {notes}: not a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or "
                     "multi-frame DICOM file, and not a scan folder"], proc.stderr
    assert proc.stdout == ""
    assert not out.exists()
    # --debug: the traceback of the same error (exit 1 from the uncaught exception)
    proc = subprocess.run([str(SCRIPT), "--debug", "prepare", "--scans", str(notes), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "InputError" in proc.stderr and "notes.txt" in proc.stderr
