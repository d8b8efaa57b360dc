"""Every project exception survives a pickle round trip (Ray sends worker errors to the driver)."""
from __future__ import annotations

import pickle

import pytest

from cardiomotion.errors import CardiomotionError, ConfigError, InputError, StageFailed
from cardiomotion.tracking import TrackingError
from cardiomotion.train.tune import TuneInterrupted


@pytest.mark.parametrize("exc", [
    CardiomotionError("something failed"),
    InputError("/data/scan/flow.nii.gz", "truncated file"),
    InputError(None, "no scans given"),
    ConfigError("configs/x.yaml", "train.w_kl: unknown key"),
    TrackingError("MLflow at http://x:5000 is unreachable"),
    TuneInterrupted("tune: the search stopped; rerun to resume"),
    StageFailed("generate: shard 1: cannot write (No space left on device); rerun to resume"),
])
def test_exception_pickles_with_its_message_and_fields(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    if isinstance(exc, InputError):
        assert (back.where, back.problem) == (exc.where, exc.problem)


def test_all_project_exception_classes_are_covered():
    """A new exception class must be added to the round-trip test above."""
    import cardiomotion.errors  # noqa: F401

    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    known = {InputError, ConfigError, TrackingError, TuneInterrupted, StageFailed}
    assert set(subclasses(CardiomotionError)) <= known | {c for c in subclasses(CardiomotionError)
                                                          if c.__module__.startswith("tests")}


def test_exclusive_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    import subprocess
    import sys

    from cardiomotion.fileio import exclusive_lock

    out = tmp_path / "prepared"
    code = ("import sys; from cardiomotion.fileio import exclusive_lock\n"
            "try:\n    exclusive_lock(sys.argv[1], 'prepare').__enter__()\nexcept Exception as e:\n"
            "    print(e); sys.exit(2)\n")
    with exclusive_lock(out, "prepare"):
        proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
        assert proc.returncode == 2 and "another `prepare` is writing this folder" in proc.stdout
        assert not out.exists()  # the lock lives next to the folder: a refused call leaves it alone
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout  # released
