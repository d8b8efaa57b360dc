"""`layout` owns every on-disk name: no other module of the package spells a file name."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import cardiomotion
from cardiomotion import layout

PACKAGE = Path(cardiomotion.__file__).parent
EXTENSIONS = r"\.(json|jsonl|nii|nii\.gz|parquet|csv|png|gif|pt|yaml|tar|sha256|lock|npy)"
FILE_NAME = re.compile(r"[\w./-]+" + EXTENSIONS)  # a whole string constant: "meta.json"
FILE_SUFFIX = re.compile(r"[\w./-]*" + EXTENSIONS)  # the tail of an f-string: f"fold_{k:03d}.png"
NOT_OURS = {"ray-schema.json"}  # the Ray autoscaler's own schema file inside the ray package


def _file_name_literals(source: str) -> list[tuple[int, str]]:
    """String constants that are file names, and f-strings that build one (their last part ends
    in a file extension: ``f"fold_{k:03d}.png"``)."""
    found = []
    tree = ast.parse(source)
    parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            last = node.values[-1] if node.values else None
            if isinstance(last, ast.Constant) and isinstance(last.value, str) and FILE_SUFFIX.fullmatch(last.value):
                found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Constant) and id(node) not in parts and isinstance(node.value, str)
              and FILE_NAME.fullmatch(node.value)):
            found.append((node.lineno, node.value))
    return sorted(found)


def test_the_detector_finds_a_spelled_file_name():
    src = ('x = 1\npath = root / "meta.json"\nmsg = "meta.json is missing"\n'
           'fig = f"fold_{k:03d}.png"\nsay = f"{path}: not a .png file"\n')
    assert _file_name_literals(src) == [(2, "meta.json"), (4, "f'fold_{k:03d}.png'")]


def test_no_module_but_layout_spells_an_on_disk_name():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == Path(layout.__file__):
            continue
        for line, name in _file_name_literals(path.read_text()):
            if name not in NOT_OURS:
                offenders.append(f"{path.relative_to(PACKAGE)}:{line}: {name!r}")
    assert offenders == [], "file names belong in cardiomotion/layout.py:\n" + "\n".join(offenders)


def test_phantom_names_are_what_the_cohort_writer_writes(tmp_path):
    from cardiomotion.data.phantom import is_complete, make_patient, write_patient

    folder = write_patient(make_patient(0, seed=0, grid=16, phases=4), tmp_path)
    for name in (layout.PHANTOM_CT, layout.PHANTOM_LABELS, layout.PHANTOM_TRUTH_FLOW, layout.PHANTOM_META):
        assert (folder / name).is_file(), name
    assert is_complete(folder)
    (folder / layout.PHANTOM_TRUTH_FLOW).unlink()
    assert not is_complete(folder)
