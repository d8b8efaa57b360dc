"""Running on a Ray cluster: the checks every job makes before any work, ``cardiomotion doctor``,
and validation of Ray cluster-launcher files (``cluster.yaml``).

A stage on a cluster can run for hours; everything that would make it fail late (an unwritable
storage root, an MLflow server nobody started, a Ray address nothing listens on) is checked
here first and reported as one :class:`~cardiomotion.errors.CardiomotionError` line.
"""
from __future__ import annotations

import difflib
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, read_yaml, storage_root
from .errors import CardiomotionError, ConfigError, InputError


@dataclass
class Check:
    """One line of ``cardiomotion doctor``."""

    name: str
    ok: bool
    detail: str


def configured_storage_root(cfg: Config) -> str | None:
    """The storage root as written: config ``storage_root``, else ``$CARDIOMOTION_STORAGE``."""
    return cfg.storage_root or os.environ.get("CARDIOMOTION_STORAGE") or None


def check_storage_root(cfg: Config, *, require_absolute: bool = False, create: bool = True) -> Path:
    """Create the storage root if needed and prove it is writable; returns its absolute path.

    Args:
        create: False only looks (``doctor``): a missing root passes if it could be created.
        require_absolute: a Ray job runs in a temporary copy of its working directory, so a
            missing or relative root would put outputs where nobody finds them again.

    Raises:
        InputError: a cloud URI (the stages write with local file APIs: mount the bucket),
            a relative/missing root when ``require_absolute``, or a root that cannot be written.
    """
    given = configured_storage_root(cfg)
    where = "storage_root" if cfg.storage_root else "$CARDIOMOTION_STORAGE" if given else "storage_root"
    if given and "://" in given:
        raise InputError(where, f"{given!r} is a URI; the stages write with local file APIs: mount the "
                                "bucket or share (EFS, Filestore, NFS, s3fs/gcsfuse) and give the mount path")
    if require_absolute:
        if not given:
            raise InputError(where, "not set; a job needs an absolute storage root on shared storage "
                                    "(storage_root in the config or $CARDIOMOTION_STORAGE): the job's working "
                                    "directory is a temporary copy")
        if not Path(given).expanduser().is_absolute():
            raise InputError(where, f"{given!r} is relative; a job needs an absolute path on shared storage "
                                    "(its working directory is a temporary copy)")
    root = storage_root(cfg)
    try:
        if not create and not root.exists():
            parent = next(p for p in root.parents if p.exists())
            if not parent.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(parent))
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(parent))
            return root
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(root, f"storage root is not writable ({exc.strerror or exc}); fix its permissions "
                               "or set storage_root / $CARDIOMOTION_STORAGE to a writable path") from None
    return root


def ray_address(cfg: Config) -> str | None:
    """The cluster a stage attaches to (same rule as :func:`cardiomotion.raycluster.init_ray`);
    None means an embedded local Ray."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def connect_ray(cfg: Config) -> str:
    """Attach to the configured cluster now (no-op without an address); returns a one-line
    description of its nodes and resources. Raises CardiomotionError if nothing answers."""
    address = ray_address(cfg)
    if address is None:
        return "embedded local Ray (started by each stage)"
    from .raycluster import init_ray

    _probe(address)
    try:
        ray = init_ray(cfg.ray)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CardiomotionError(f"Ray cluster {address!r} is unreachable ({first}); start it "
                                "(ray up cluster.yaml / ray start --head) or set ray.address: null") from None
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    gpus = f", {res['GPU']:g} GPUs" if res.get("GPU") else ""
    return f"cluster {address}: {nodes} nodes, {res.get('CPU', 0):g} CPUs{gpus}"


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a host:port nobody listens at (ray.init retries for minutes)."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or ""  # else Ray's own lookup fails fast
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise CardiomotionError(f"Ray cluster {address!r} is unreachable ({exc.strerror or exc}); start it "
                                "(ray up cluster.yaml / ray start --head) or set ray.address: null") from None


@dataclass
class Preflight:
    """What a job found before it started."""

    storage_root: Path
    tracking_uri: str | None
    ray: str


def preflight(cfg: Config, *, tracking: bool = True, job: bool = True, connect: bool = True) -> Preflight:
    """The checks a stage makes before any work, in the order a user fixes them.

    Storage root writable (absolute for a job), MLflow reachable (if ``tracking``: an http(s)
    server must answer), Ray attached (if ``connect`` and an address is configured or the job
    runs inside Ray). Raises the first problem as a one-line CardiomotionError.
    """
    from .tracking import check_reachable, tracking_uri

    root = check_storage_root(cfg, require_absolute=job)
    uri = None
    if tracking:
        uri = tracking_uri(cfg)
        check_reachable(uri)
    ray = connect_ray(cfg) if connect else (ray_address(cfg) or "embedded local Ray")
    return Preflight(storage_root=root, tracking_uri=uri, ray=ray)


# ---------------------------------------------------------------------------- cluster files
def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _describe(err) -> str:
    """A jsonschema ValidationError as 'key.path: problem', naming an unknown key and its likely fix."""
    loc = ".".join(str(p) for p in err.absolute_path) or "top level"
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = set(err.schema.get("properties", {}))
        extra = sorted(k for k in err.instance if k not in allowed)
        if extra:
            return f"{loc}: unknown key {extra[0]!r}{_closest(extra[0], allowed)}"
    if err.validator == "required":
        return f"{loc}: {err.message}"
    return f"{loc}: {err.message}"


def validate_cluster_file(path: str | Path) -> dict[str, Any]:
    """Validate a Ray cluster-launcher YAML (``ray up`` input) against Ray's own schema, with
    provider defaults merged in as ``ray up`` does; returns the prepared config.

    Raises:
        ConfigError: missing file, not YAML, or the first schema violation as
            ``FILE: key.path: problem`` (an unknown key names its closest valid spelling).
    """
    path = Path(path)
    raw = read_yaml(path, "cluster file")
    if not isinstance(raw, dict) or "provider" not in raw or not isinstance(raw.get("provider"), dict):
        raise ConfigError(path, "not a Ray cluster-launcher file (needs a 'provider' mapping)")
    try:
        import jsonschema
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:
        raise CardiomotionError(f"validating cluster files needs ray[default] and jsonschema ({exc})") from None
    # Ray's own schema first, on the file as written: prepare_config would trip over some
    # typos with a KeyError before the schema could name them.
    schema_err = _first_schema_error(raw)
    if schema_err:
        raise ConfigError(path, schema_err)
    import logging

    quiet = logging.getLogger("ray.autoscaler._private.util")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # "setting max workers for head node type to 0"
    try:
        prepared = prepare_config(raw)
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        raise ConfigError(path, _describe(exc)) from None
    except Exception as exc:  # Ray's own checks (ValueError, ClickException from cli_logger.abort, ...)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(path, msg) from None
    finally:
        quiet.setLevel(level)
    return prepared


def _first_schema_error(raw: dict) -> str | None:
    import json

    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(raw), key=lambda e: list(e.absolute_path))
    # 'required' keys are often filled in by the provider's defaults: not an error of the file.
    errors = [e for e in errors if e.validator != "required"]
    return _describe(errors[0]) if errors else None


# ---------------------------------------------------------------------------- doctor
def doctor(cfg: Config, cluster_file: str | Path | None = None, *, connect: bool = True) -> list[Check]:
    """Every pre-flight check, none stopping the others (``cardiomotion doctor``)."""
    from .tracking import check_reachable, tracking_uri

    checks: list[Check] = []
    try:
        root = check_storage_root(cfg, create=False)
        checks.append(Check("storage root", True, f"{root} is writable" if root.exists()
                            else f"{root} does not exist yet; it can be created"))
    except CardiomotionError as exc:
        checks.append(Check("storage root", False, str(exc)))
    uri = None
    try:
        uri = tracking_uri(cfg)
        check_reachable(uri)
        how = "server answers /health" if uri.startswith(("http://", "https://")) else "local store"
        checks.append(Check("MLflow", True, f"{uri} ({how})"))
    except CardiomotionError as exc:
        checks.append(Check("MLflow", False, str(exc)))
    if connect:
        try:
            checks.append(Check("Ray", True, connect_ray(cfg)))
        except CardiomotionError as exc:
            checks.append(Check("Ray", False, str(exc)))
    else:
        checks.append(Check("Ray", True, ray_address(cfg) or "embedded local Ray (started by each stage)"))
    if cluster_file is not None:
        try:
            prepared = validate_cluster_file(cluster_file)
            types = prepared.get("available_node_types", {})
            checks.append(Check("cluster file", True, f"{cluster_file} passes Ray's schema "
                                                      f"({prepared['provider']['type']}, {len(types)} node types)"))
        except CardiomotionError as exc:
            checks.append(Check("cluster file", False, str(exc)))
    return checks
