"""What every Ray Job entry point in jobs/ shares: argument handling and the checks before work.

A job is the stage's ``cardiomotion`` command with three differences:

- ``--config`` is required (a cluster run must say which settings it uses; a path relative to
  the job's working directory, i.e. the folder given to ``ray job submit --working-dir``);
- input/output folders default to fixed places under the storage root (``prepared/``,
  ``annotations/``, ``cv/``, ``tune/``, ``corpus/``), and relative paths are taken relative to the
  storage root, never to the job's working directory (a temporary copy that Ray deletes);
- before any work it checks the storage root is writable, the MLflow server answers and the Ray
  cluster is reachable (:func:`cardiomotion.cluster.preflight`), and prints what it found.

Then it runs the command (``cardiomotion.cli``): same flags, output and errors (one ``error:``
line, exit 2). Flags a job does not define itself are passed on to the command unchanged.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_cardiomotion():
    """The installed package (the cluster's setup commands install it); else this checkout's
    ``platform/`` (running from a clone without installing: the driver only, Ray workers still
    need the package installed or shipped with ``--runtime-env-json '{"py_modules": [...]}'``)."""
    try:
        import cardiomotion
    except ImportError:
        sys.path.insert(0, str(REPO / "platform"))
        import cardiomotion
    return cardiomotion


@dataclass(frozen=True)
class PathFlag:
    """A folder/file flag of a job. ``default``: sub-folder of the storage root ('' = the root
    itself); None: the flag has no default (required unless ``optional``)."""

    flag: str
    help: str
    default: str | None = None
    many: bool = False  # nargs='+', shell-style patterns expanded on the cluster
    optional: bool = False
    uri: bool = False  # also takes URIs (runs:/…, models:/…, s3://…), passed on unchanged


def run_job(stage: str, command: str, doc: str, paths: list[PathFlag], *, tracking: bool = True,
            argv: list[str] | None = None) -> int:
    """Parse a job's arguments, check the cluster, run ``cardiomotion <command>``; the exit status.

    Args:
        stage: the job's name (jobs/<stage>.py).
        command: the ``cardiomotion`` sub-command it runs.
        doc: the job module's docstring (help text).
        paths: the job's folder flags, resolved against the storage root.
        tracking: check the MLflow server first (off for stages that log nothing).
    """
    summary, _, details = doc.strip().partition("\n")
    from cardiomotion.cli import OneLineErrorParser

    parser = OneLineErrorParser(  # usage errors in one line, as the command's
        prog=f"jobs/{stage}.py", description=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(details.strip() + "\n\n" if details.strip() else "")
        + f"Relative paths are taken relative to the storage root. Other flags go to "
          f"`cardiomotion {command}` unchanged (see `cardiomotion {command} --help`).")
    parser.add_argument("--config", required=True,
                        help="YAML stage config, e.g. configs/cluster.yaml (relative to the job's working directory)")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    for p in paths:
        default = "(no default)" if p.default is None else f"(default: <storage root>/{p.default})" if p.default else "(default: the storage root)"
        parser.add_argument(p.flag, nargs="+" if p.many else None,
                            required=p.default is None and not p.optional, help=f"{p.help} {default}")
    args, extra = parser.parse_known_args(argv)

    if not args.debug:  # read when ray is first imported: keep Ray's INFO lines out of the job log
        os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    import_cardiomotion()
    from cardiomotion import __version__
    from cardiomotion.cli import build_parser, main
    from cardiomotion.cluster import preflight
    from cardiomotion.config import load_config
    from cardiomotion.errors import CardiomotionError

    if command not in _subcommands(build_parser()):
        print(f"error: cardiomotion {__version__} has no `{command}` command: install a version with "
              f"the {stage} stage on the cluster", file=sys.stderr)
        return 2
    config = Path(args.config).expanduser().resolve()
    try:
        if not config.is_file():
            raise CardiomotionError(f"{args.config}: config file does not exist (relative to the job's "
                                    f"working directory {Path.cwd()}; submit with --working-dir .)")
        cfg = load_config(config)
        pre = preflight(cfg, tracking=tracking, job=True)
    except CardiomotionError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2

    cli_argv = [command, "--config", str(config)]
    for p in paths:
        value = getattr(args, p.flag.lstrip("-").replace("-", "_"))
        if value is None and p.default is None:
            continue
        if p.many:
            cli_argv += [p.flag, *_expand(value, pre.storage_root)]
        elif p.uri and value is not None and _is_uri(value):
            cli_argv += [p.flag, value]
        else:
            cli_argv += [p.flag, str(_under(value if value is not None else p.default, pre.storage_root))]
    cli_argv += extra
    print(f"cardiomotion {__version__} job {stage}", flush=True)
    print(f"  config        {config}", flush=True)
    print(f"  storage root  {pre.storage_root}", flush=True)
    if pre.tracking_uri:
        print(f"  MLflow        {pre.tracking_uri}", flush=True)
    print(f"  Ray           {pre.ray}", flush=True)
    print(f"  running       cardiomotion {' '.join(cli_argv)}", flush=True)
    return main((["--debug"] if args.debug else []) + cli_argv)


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def _is_uri(value: str) -> bool:
    """runs:/…, models:/…, s3://… (not a path; a Windows drive letter is no concern on a cluster)."""
    return re.match(r"^[A-Za-z][\w+.-]*:/", value) is not None


def _under(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _expand(patterns: list[str], root: Path) -> list[str]:
    """Paths relative to the storage root; shell patterns (quoted on the submitting machine)
    expanded here, on the cluster. A pattern matching nothing stays as given: the stage names it."""
    out: list[str] = []
    for pattern in patterns:
        full = str(_under(pattern, root))
        matches = sorted(glob.glob(full)) if glob.has_magic(full) else []
        out += matches or [full]
    return out
