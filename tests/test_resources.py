"""config.Resources: one shape of resource request for every stage, and the flat keys it replaced."""
from __future__ import annotations

from pathlib import Path

import pytest

from cardiomotion.config import Resources, load_config
from cardiomotion.errors import ConfigError


def test_bundle_is_the_ray_request_of_one_worker():
    r = Resources(cpus=2, gpus=0.25)
    assert r.bundle(use_gpu=False) == {"CPU": 2.0}
    assert r.bundle(use_gpu=True) == {"CPU": 2.0, "GPU": 0.25}


def test_every_stage_has_the_same_resources_block():
    cfg = load_config(None, {})
    for section in (cfg.annotate, cfg.train, cfg.generate, cfg.utility):
        assert section.resources == Resources()


@pytest.mark.parametrize("section, flat, nested", [
    ("train", {"cpus_per_worker": 0.5, "gpus_per_worker": 0.25, "use_gpu": False},
     {"cpus": 0.5, "gpus": 0.25, "use_gpu": False}),
    ("generate", {"cpus_per_actor": 3, "gpus_per_actor": 0.5, "use_gpu": True},
     {"cpus": 3.0, "gpus": 0.5, "use_gpu": True}),
    ("annotate", {"use_gpu": False}, {"use_gpu": False}),
    ("utility", {"cpus_per_run": 2}, {"cpus": 2.0}),
])
def test_flat_keys_of_older_configs_read_as_resources(section, flat, nested):
    old = load_config(None, {section: flat})
    new = load_config(None, {section: {"resources": nested}})
    assert getattr(old, section) == getattr(new, section)
    assert getattr(old, section).resources == Resources(**nested)


def test_a_flat_key_and_its_resources_key_together_is_one_error(tmp_path: Path):
    f = tmp_path / "both.yaml"
    f.write_text("train:\n  cpus_per_worker: 2\n  resources:\n    cpus: 1\n")
    with pytest.raises(ConfigError, match=r"both.yaml.*train.*cpus_per_worker and resources.cpus both set"):
        load_config(f)


def test_resources_do_not_enter_the_sweep_fingerprint():
    """Where a fold trains (CPUs, GPU share) does not change what it learns: a sweep resumed on
    another cluster shape is the same sweep."""
    from cardiomotion.train.sweep import sweep_fingerprint

    a = load_config(None, {"train": {"resources": {"cpus": 1}}})
    b = load_config(None, {"train": {"resources": {"cpus": 4, "gpus": 0.25, "use_gpu": True}}})
    c = load_config(None, {"train": {"lr": 0.01}})
    p, f = Path("/p"), Path("/f")
    assert sweep_fingerprint(p, f, a) == sweep_fingerprint(p, f, b)
    assert sweep_fingerprint(p, f, a) != sweep_fingerprint(p, f, c)
    assert "resources" not in sweep_fingerprint(p, f, a)["train"]
