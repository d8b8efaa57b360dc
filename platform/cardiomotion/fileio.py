"""Atomic writes and small file helpers: nothing half-written ever appears under a final name."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .layout import lock_name


def _read_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (briefly) and restoring it
    os.umask(mask)
    return mask


def _publish_mode(path: Path, is_dir: bool) -> None:
    """Give a finished temporary the mode a plain open()/mkdir() would have given it.

    mkstemp/mkdtemp create 0600/0700 entries; renamed into place as they are, every output
    would be private to its writer (other users, a cluster's services, could not read it).
    """
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_read_umask())


def _suffixes(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` when the block succeeds.

    The temporary name keeps the extension (nibabel and pyarrow pick the format from it). On
    error the temporary file is removed and ``path`` is untouched. A file-system error that names
    no file (a write into a full disk: ``[Errno 28]`` alone) is re-raised naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{_suffixes(path)}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish_mode(tmp_path, is_dir=False)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it onto ``path`` when the block succeeds.

    ``path`` must not exist yet, or be an empty folder (a finished output is never replaced by
    a partial one): anything else there raises FileExistsError before any work is done. With
    ``replace``, an existing folder is replaced as a whole once the new one is complete (moved
    aside, the new one renamed in, the old one removed); the caller decides it may be.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()) or (
            not replace and path.exists() and any(path.iterdir())):
        raise FileExistsError(errno.EEXIST, "already exists: will not replace it", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _publish_mode(tmp, is_dir=True)
        if replace and path.is_dir() and any(path.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # onto the empty folder just made
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (sorted keys, indented)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return path


def read_json_lines(path: str | Path, log=None, repair: bool = True) -> list[dict]:
    """The rows of an append-only JSON-lines results file (``[]`` when absent).

    A process killed while appending leaves a truncated last line: it is dropped (``log`` is told)
    and, with ``repair`` (the writer's view), the file rewritten atomically without it, so the next
    append starts a valid line and that row is simply made again; readers that must not touch a
    folder another process may be appending to pass ``repair=False``. A bad line anywhere else is
    damage, not an interrupted append: :class:`~cardiomotion.errors.InputError` naming the file and line.
    """
    from .errors import InputError

    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows: list[dict] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i < len(lines):
                raise InputError(path, f"line {i} is not JSON ({exc.msg})") from None
            if log is not None:
                log(f"{path}: line {i} is truncated ({exc.msg}); dropped, that row is made again")
            if repair:
                with atomic_path(path) as tmp:
                    tmp.write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in rows))
    return rows


def append_json_lines(path: str | Path, rows: list[dict]) -> Path:
    """Append ``rows`` to a JSON-lines file in one write, first closing a line a killed writer
    left without its newline (so the new rows never glue onto it)."""
    path = Path(path)
    gap = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with path.open("a") as fh:
        fh.write(("\n" if gap else "") + "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, *, intent: int | None = None) -> Path:
    """Write a NIfTI-1 image atomically with ``affine`` as sform and qform (code 1, scanner)."""
    import nibabel as nib  # here, not at import: the GPU suite imports fileio on machines without nibabel

    affine = np.asarray(affine, dtype=float)
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if intent is not None:
        img.header.set_intent(intent)
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


@contextmanager
def exclusive_lock(target: str | Path, stage: str) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on the output folder ``target`` of ``stage``.

    The lock is an ``flock`` on the hidden file ``.<name>.<stage>.lock`` next to ``target`` (so a
    refused call leaves ``target`` itself untouched); the kernel drops it when the process dies,
    so a killed run never leaves a stale lock.

    Raises:
        InputError: another process holds the lock (a second run on the same folder).
    """
    import fcntl

    from .errors import InputError

    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / lock_name(target.name, stage)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(target, f"another `{stage}` is writing this folder right now: wait for it, "
                                     "or use another --out") from None
        try:
            yield path
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def removed_if_refused(out: str | Path, stage: str, made: Callable[[Path], Iterable[Path]] = lambda out: (out,)
                       ) -> Iterator[Path]:
    """Hold :func:`exclusive_lock` on ``out`` for ``stage`` and, where ``out`` did not exist and the
    body raises :class:`~cardiomotion.errors.InputError`, remove what the call made: the folders
    and files ``made(out)`` (default: ``out`` itself), then ``out`` if nothing else is in it.
    Yields the resolved ``out``. Only refusals are undone: a run that failed for another reason
    keeps what it finished, for the rerun to resume. The lock is held throughout, so no other call
    of ``stage`` makes or removes ``out`` meanwhile."""
    from .errors import InputError

    out = Path(out).expanduser().resolve()
    with exclusive_lock(out, stage):
        fresh = not out.exists()
        try:
            yield out
        except InputError:
            if fresh:
                for path in made(out):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                try:
                    out.rmdir()  # only if nothing else is there
                except OSError:
                    pass
            raise
