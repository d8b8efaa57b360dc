"""Corpus generation: determinism, resume, reader consistency, export, flat memory, bad input.

Runs a random-weight model (cardiomotion.generate.synthetic; its decoder head is scaled to give
flows of a few voxels) logged as a real MLflow run, on a synthetic 3-scan prepared dataset at
32³, with one CPU actor on the session's Ray.
"""
from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from cardiomotion.config import dump_config, load_config
from cardiomotion.errors import InputError

torch.set_num_threads(1)

N = 10
SEED = 7
GEN = {"shard_size": 4, "batch_size": 3, "actors": 1, "previews": 1, "gif_frames": 4,
       "traversal_directions": 1, "traversal_steps": 3}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A random-weight model logged to an MLflow run (runs:/<id>/model) and a prepared dataset."""
    import mlflow

    from cardiomotion import tracking
    from cardiomotion.generate.synthetic import make_random_model_dir, make_synthetic_prepared

    root = tmp_path_factory.mktemp("generate")
    cfg = load_config(None, {"storage_root": str(root / "store"), "generate": GEN,
                             "ray": {"num_cpus": 2, "dashboard": False}})
    model_dir = make_random_model_dir(root / "model_dir", grid=(32, 32, 32), channels=(8, 16, 32), latent_channels=4)
    prepared = make_synthetic_prepared(root / "prepared", n_scans=3, grid=(32, 32, 32))
    with tracking.start_run(cfg, "train_stub", tags={"stage": "train"}) as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
    return {"root": root, "cfg": cfg, "uri": f"runs:/{run.info.run_id}/model", "run_id": run.info.run_id,
            "model_dir": model_dir, "prepared": prepared}


@pytest.fixture(scope="module")
def corpus(inputs, ray_session):
    from cardiomotion.generate import generate_corpus

    out = inputs["root"] / "corpus"
    manifest = generate_corpus(inputs["uri"], inputs["prepared"], out, N, seed=SEED, cfg=inputs["cfg"])
    return out, manifest


def _digests(out: Path) -> dict[str, str]:
    man = json.loads((out / "manifest.json").read_text())
    return {s["name"]: s["sha256"] for s in man["shards"]}


def test_corpus_layout_manifest_and_reader(corpus, inputs):
    from cardiomotion.generate import open_corpus, scan_indices
    from cardiomotion.generate.model import sha256_file

    out, manifest = corpus
    man = json.loads(manifest.read_text())
    assert (man["n"], man["n_shards"], man["shard_size"], man["seed"], man["temperature"]) == (N, 3, 4, SEED, inputs["cfg"].generate.temperature)
    assert [s["count"] for s in man["shards"]] == [4, 4, 2]
    assert man["model"]["uri"] == inputs["uri"]
    assert man["model"]["cvae_sha256"] == sha256_file(inputs["model_dir"] / "cvae.pt")
    assert sum(man["counts"]["per_scan"].values()) == N
    assert max(man["counts"]["per_scan"].values()) - min(man["counts"]["per_scan"].values()) <= 1  # balanced
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [s["name"] for s in man["shards"]]
    assert not list(out.glob(".*tmp*"))
    c = open_corpus(out)
    assert len(c) == N and c.verify() == []
    scan_ids = [s["scan_id"] for s in man["scans"]]
    for i in range(N):
        s = c[i]
        assert s["index"] == i and s["meta"]["index"] == i and s["meta"]["seed"] == SEED
        assert s["scan_id"] == scan_ids[scan_indices(SEED, 3, [i])[0]]
        assert s["meta"]["model_uri"] == inputs["uri"]
        assert s["es"].dtype == np.int16 and s["ed_syn"].dtype == np.int16 and s["flow"].dtype == np.float16
        assert s["es"].shape == (32, 32, 32) and s["flow"].shape == (3, 32, 32, 32)
        np.testing.assert_allclose(s["affine"], man["scans"][scan_ids.index(s["scan_id"])]["affine"])
    assert c[-1]["index"] == N - 1
    with pytest.raises(IndexError):
        c[N]


def test_a_damaged_corpus_is_refused_in_one_line_naming_the_shard(corpus, tmp_path, capsys):
    """A copy of the corpus with one member's bytes overwritten in place (size kept), and one whose
    manifest lost "n": `export` exits 2 with one line naming the shard or the manifest, no
    traceback; verify() names the damaged shard."""
    import shutil

    from cardiomotion.cli import main
    from cardiomotion.errors import InputError
    from cardiomotion.generate import open_corpus
    from cardiomotion.generate.engine import sample_key

    damaged = tmp_path / "damaged"
    shutil.copytree(corpus[0], damaged)
    c = open_corpus(damaged)
    off, size = c._offsets(0)[f"{sample_key(1)}.es.npy"]  # sample 1 lives in shard 0 (4 a shard)
    with open(c.shard_path(0), "r+b") as f:
        f.seek(off)
        f.write(b"\0" * size)
    assert open_corpus(damaged).verify() == [c.shards[0]["name"]]
    with pytest.raises(InputError, match=r"shard-.*sample 1 is damaged"):
        open_corpus(damaged)[1]
    assert main(["export", "--corpus", str(damaged), "--index", "1", "--out", str(tmp_path / "x"), "--no-gif"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sample 1 is damaged" in err and "Traceback" not in err
    man = json.loads((damaged / "manifest.json").read_text())
    del man["n"]
    (damaged / "manifest.json").write_text(json.dumps(man))
    assert main(["export", "--corpus", str(damaged), "--index", "1", "--out", str(tmp_path / "y"), "--no-gif"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json: damaged manifest: no n" in err


def test_the_streaming_readers_refuse_a_shard_cut_off_or_damaged_instead_of_losing_its_samples(corpus, tmp_path):
    """A copy of the corpus whose shard 1 (samples 4-7) is cut off at the start of sample 6: the
    torch dataset and the Ray Dataset refuse, naming the shard (they yielded 8 of 10 samples
    before, without a word), as `corpus[6]` does. The same shard with a member zeroed in place
    (size kept): the torch dataset names it too (was a bare KeyError)."""
    import shutil
    import tarfile

    from cardiomotion.errors import InputError
    from cardiomotion.generate import open_corpus
    from cardiomotion.generate.corpus import iter_shard
    from cardiomotion.generate.engine import sample_key

    cut = tmp_path / "cut"
    shutil.copytree(corpus[0], cut)
    c = open_corpus(cut)
    shard = c.shard_path(1)
    with tarfile.open(shard) as tar:
        start = next(m.offset for m in tar.getmembers() if m.name.startswith(f"{sample_key(6)}."))
    os.truncate(shard, start)
    with pytest.raises(InputError, match=rf"{shard.name}: shard is {start} bytes where the manifest records"):
        [s["index"] for s in c.torch_dataset()]
    with pytest.raises(InputError, match=rf"{shard.name}: shard is {start} bytes"):
        c.ray_dataset()
    assert c.ray_dataset(limit=4).count() == 4  # the shards before it still read
    # without the manifest's record (the size check), the count and the order still tell
    with pytest.raises(InputError, match=rf"{shard.name}: holds 2 samples where the manifest records 4"):
        list(iter_shard(shard, {**c.shards[1], "bytes": start}))
    zeroed = tmp_path / "zeroed"
    shutil.copytree(corpus[0], zeroed)
    z = open_corpus(zeroed)
    off, size = z._offsets(1)[f"{sample_key(5)}.json"]
    with open(z.shard_path(1), "r+b") as f:
        f.seek(off - 512)  # the member's tar header and its bytes
        f.write(b"\0" * (size + 512))
    with pytest.raises(InputError, match=rf"{z.shard_path(1).name}: "):
        list(z.torch_dataset())


def test_reader_samples_satisfy_ed_syn_equals_warp_es_by_flow(corpus):
    from cardiomotion.flow.warp import warp
    from cardiomotion.generate import open_corpus

    c = open_corpus(corpus[0])
    moved = 0.0
    for i in range(N):
        s = c[i]
        es = torch.from_numpy(s["es"].astype(np.float32))[None, None]
        u = torch.from_numpy(s["flow"].astype(np.float32))[None]
        ed = warp(es, u)[0, 0].numpy()
        assert np.abs(ed - s["ed_syn"].astype(np.float32)).max() <= 0.5 + 1e-3  # int16 rounding only
        moved = max(moved, float(np.abs(s["flow"].astype(np.float32)).max()))
        assert np.abs(s["ed_syn"].astype(np.float32) - s["es"]).max() > 50  # the warp did something
    assert moved > 1.0  # flows of voxels, not the identity map


def test_sample_regenerated_alone_is_byte_identical(corpus, inputs):
    from cardiomotion.generate import open_corpus, regenerate_sample

    c = open_corpus(corpus[0])
    for i in (0, 5, 9):  # first of a shard; inside a second block; the last, short shard
        assert regenerate_sample(corpus[0], i, cfg=inputs["cfg"], raw=True) == c.raw(i), i


def test_latents_are_a_function_of_seed_and_index_only(inputs):
    from cardiomotion.generate.engine import SampleEngine, sample_seed
    from cardiomotion.generate.conditioning import load_frames
    from cardiomotion.generate.model import resolve_model

    resolved = resolve_model(inputs["model_dir"], inputs["cfg"])
    frames = load_frames(inputs["prepared"])
    spec = {"seed": SEED, "temperature": 0.5, "window": list(resolved.window), "flow_dtype": "float16",
            "model_uri": "x", "model_sha256": "y"}
    eng = SampleEngine(resolved.blobs(), frames, spec)
    z = eng.latents([3, 4, 5])
    assert torch.equal(eng.latents([4])[0], z[1])  # independent of the other samples in the batch
    assert float(z.std()) == pytest.approx(0.5, rel=0.2)  # temperature
    assert sample_seed(SEED, 4) != sample_seed(SEED + 1, 4) != sample_seed(SEED, 5)
    other = SampleEngine(resolved.blobs(), frames, {**spec, "seed": SEED + 1})
    assert not torch.equal(other.latents([4]), eng.latents([4]))


def test_deterministic_cudnn_holds_only_inside_the_block():
    """The engine's deterministic cuDNN is scoped: the process's flags (autotuning on, as the
    training recipe sets them) hold again after the block, also after an error inside it."""
    from cardiomotion.generate.engine import deterministic_cudnn

    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    try:
        cudnn.deterministic, cudnn.benchmark = False, True
        with deterministic_cudnn(True):
            assert (cudnn.deterministic, cudnn.benchmark) == (True, False)
        assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
        with pytest.raises(RuntimeError), deterministic_cudnn(True):
            raise RuntimeError("inside")
        assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
        with deterministic_cudnn(False):  # a CPU engine touches nothing
            assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def test_the_engine_runs_its_networks_inside_its_deterministic_scope(inputs, monkeypatch):
    """Every network call of the engine (the ES pyramid at construction, the decoder per block)
    happens inside ``_deterministic`` (on CUDA: deterministic cuDNN), and only there."""
    from contextlib import contextmanager

    import cardiomotion.generate.model as model_mod
    from cardiomotion.generate.conditioning import load_frames
    from cardiomotion.generate.engine import SampleEngine
    from cardiomotion.generate.model import resolve_model

    depth: list[int] = [0]
    seen: list[tuple[str, int]] = []

    @contextmanager
    def recording(self):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real_load = model_mod.load_networks

    def load_recorded(blobs, device="cpu"):
        model, pyramid = real_load(blobs, device)
        decode, forward = model.decode, pyramid.forward
        model.decode = lambda *a, **k: (seen.append(("decode", depth[0])), decode(*a, **k))[1]
        pyramid.forward = lambda *a, **k: (seen.append(("pyramid", depth[0])), forward(*a, **k))[1]
        return model, pyramid

    resolved = resolve_model(inputs["model_dir"], inputs["cfg"])
    monkeypatch.setattr(SampleEngine, "_deterministic", recording)
    monkeypatch.setattr(model_mod, "load_networks", load_recorded)
    spec = {"seed": SEED, "temperature": 1.0, "window": list(resolved.window), "flow_dtype": "float32",
            "model_uri": "x", "model_sha256": "y"}
    eng = SampleEngine(resolved.blobs(), load_frames(inputs["prepared"]), spec)
    eng.decode_block([0, 1])
    assert {name for name, _ in seen} == {"pyramid", "decode"}
    assert all(d == 1 for _, d in seen), seen
    assert depth[0] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_engine_leaves_the_process_cudnn_flags_alone(inputs):
    from cardiomotion.generate.conditioning import load_frames
    from cardiomotion.generate.engine import SampleEngine
    from cardiomotion.generate.model import resolve_model

    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    try:
        cudnn.deterministic, cudnn.benchmark = False, True
        resolved = resolve_model(inputs["model_dir"], inputs["cfg"])
        spec = {"seed": SEED, "temperature": 1.0, "window": list(resolved.window), "flow_dtype": "float32",
                "model_uri": "x", "model_sha256": "y"}
        eng = SampleEngine(resolved.blobs(), load_frames(inputs["prepared"]), spec, device="cuda")
        a = eng.decode_block([0, 1])
        assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
        b = eng.decode_block([0, 1])
        assert np.array_equal(a["flow"], b["flow"]) and np.array_equal(a["ed_syn"], b["ed_syn"])
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def test_torch_dataset_shards_across_workers_and_shuffles(corpus, monkeypatch):
    import torch.utils.data as tud

    from cardiomotion.generate import open_corpus

    c = open_corpus(corpus[0])
    plain = [s["index"] for s in c.torch_dataset()]
    assert plain == list(range(N))
    batch = next(iter(tud.DataLoader(c.torch_dataset(), batch_size=4)))
    assert batch["flow"].shape == (4, 3, 32, 32, 32) and batch["flow"].dtype == torch.float16

    class Info:
        def __init__(self, wid):
            self.id, self.num_workers = wid, 2

    seen = []
    for wid in (0, 1):
        monkeypatch.setattr(tud, "get_worker_info", lambda wid=wid: Info(wid))
        seen.append([s["index"] for s in c.torch_dataset(shuffle_buffer=3, seed=1)])
    monkeypatch.undo()
    assert sorted(seen[0] + seen[1]) == list(range(N)) and not set(seen[0]) & set(seen[1])
    ds = c.torch_dataset(shuffle_buffer=4, seed=1)
    first = [s["index"] for s in ds]
    assert sorted(first) == list(range(N)) and first != plain
    assert [s["index"] for s in ds] == first  # same (seed, epoch): same order
    ds.set_epoch(1)
    assert [s["index"] for s in ds] != first
    ranks = [[s["index"] for s in c.torch_dataset(rank=r, world_size=3)] for r in range(3)]
    assert sorted(sum(ranks, [])) == list(range(N))


def test_export_writes_nifti_simpleitk_reads_the_flow(corpus, inputs, tmp_path):
    import SimpleITK as sitk
    from PIL import Image

    from cardiomotion.cli import main
    from cardiomotion.generate import open_corpus

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_config(inputs["cfg"]))
    out = tmp_path / "export"
    assert main(["export", "--corpus", str(corpus[0]), "--index", "6", "--out", str(out), "--traversal",
                 "--config", str(cfg_file)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"es.nii.gz", "ed_syn.nii.gz", "flow.nii.gz", "sample.json", "transition.gif", "traversal.png"} <= names
    with Image.open(out / "transition.gif") as gif:
        assert gif.n_frames == 2 * GEN["gif_frames"] - 2
    s = open_corpus(corpus[0])[6]
    es_img = sitk.ReadImage(str(out / "es.nii.gz"), sitk.sitkFloat64)
    field = sitk.ReadImage(str(out / "flow.nii.gz"), sitk.sitkVectorFloat64)
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetSize() == (32, 32, 32)
    transform = sitk.DisplacementFieldTransform(field)
    resampled = sitk.Resample(es_img, es_img, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    itk_ed = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)
    u = s["flow"].astype(np.float32)
    pos = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij")) + u
    inside = np.all((pos > 0.5) & (pos < 30.5), axis=0)  # away from the border padding
    assert inside.mean() > 0.5
    np.testing.assert_allclose(itk_ed[inside], s["ed_syn"][inside], atol=0.51)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ed_syn.nii.gz"))).transpose(2, 1, 0),
                                  s["ed_syn"])
    # sample.json describes the exported flow (mm, float32), the corpus's own (voxels, float16) under corpus_sample
    meta = json.loads((out / "sample.json").read_text())
    assert (meta["flow_units"], meta["flow_dtype"], meta["flow_file"]) == ("mm", "float32", "flow.nii.gz")
    assert (meta["corpus_sample"]["flow_units"], meta["corpus_sample"]["flow_dtype"]) == ("voxels", "float16")
    mm = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "flow.nii.gz"), sitk.sitkVectorFloat64))  # (K, J, I, 3) LPS mm
    spacing = float(meta["spacing_mm"])
    np.testing.assert_allclose(np.abs(mm).max(), spacing * np.abs(u).max(), rtol=1e-3)


def test_export_with_a_model_that_is_not_the_corpus_writes_nothing(corpus, inputs, tmp_path, capsys):
    """--traversal with a model that does not open: refused in one line before any file is written
    (the NIfTI files and the GIF were written first)."""
    from cardiomotion.cli import main

    out = tmp_path / "export"
    model_dir = tmp_path / "no_model_here"
    assert main(["export", "--corpus", str(corpus[0]), "--index", "1", "--out", str(out), "--traversal",
                 "--model", str(model_dir), "--no-gif"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("index", ["-1", "100000"])
def test_export_refuses_an_index_outside_the_corpus(corpus, tmp_path, capsys, index):
    from cardiomotion.cli import main

    out = tmp_path / "export"
    assert main(["export", "--corpus", str(corpus[0]), "--index", index, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--index {index} is outside the corpus" in err and "Traceback" not in err
    assert not out.exists()


def test_export_into_an_earlier_export_replaces_it_whole_and_refuses_a_folder_of_other_files(corpus, tmp_path, capsys):
    """Sample 3 with its GIF, then sample 5 without one into the same --out: the folder is sample
    5's export alone (the GIF of sample 3 stayed beside it before). A folder holding anything else
    is refused in one line and left as it was."""
    from cardiomotion.cli import main

    out = tmp_path / "export"
    assert main(["export", "--corpus", str(corpus[0]), "--index", "3", "--out", str(out)]) == 0
    assert (out / "transition.gif").is_file()
    assert main(["export", "--corpus", str(corpus[0]), "--index", "5", "--out", str(out), "--no-gif"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ed_syn.nii.gz", "es.nii.gz", "flow.nii.gz", "sample.json"]
    assert json.loads((out / "sample.json").read_text())["index"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(["export", "--corpus", str(corpus[0]), "--index", "5", "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.txt, not an export" in err, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_export_finds_the_model_in_the_store_the_corpus_recorded_and_a_lookup_creates_no_store(corpus, inputs, tmp_path):
    """The corpus was made from runs:/<id>/model in the fixture's store; a later command whose
    storage root is elsewhere (as after `make demo`, whose store is demo_output/mlflow.db) finds
    the model in the store the manifest recorded. Looking a URI up in a store that does not exist
    refuses without creating it (it left an empty mlflow.db behind)."""
    from cardiomotion.errors import InputError
    from cardiomotion.generate.export import export_sample
    from cardiomotion.generate.model import resolve_corpus_model, resolve_model
    from cardiomotion.tracking import tracking_uri

    man = json.loads(corpus[1].read_text())
    assert man["model"]["tracking_uri"] == tracking_uri(inputs["cfg"])
    elsewhere = load_config(None, {"storage_root": str(tmp_path / "elsewhere"), "generate": GEN})
    with pytest.raises(InputError, match=r"model URI does not resolve .*no MLflow store at .*elsewhere/mlflow.db"):
        resolve_model(inputs["uri"], elsewhere)
    assert not (tmp_path / "elsewhere").exists()
    paths = export_sample(corpus[0], 1, tmp_path / "x", gif=False, traversal=True, cfg=elsewhere)
    assert paths["traversal"].is_file() and not (tmp_path / "elsewhere").exists()
    # a recorded store that is gone too: one error naming both
    gone = {**man, "model": {**man["model"], "tracking_uri": f"sqlite:///{tmp_path / 'gone.db'}"}}
    with pytest.raises(InputError, match=r"elsewhere/mlflow.db.*nor in the store the corpus recorded .*gone.db"):
        resolve_corpus_model(gone, None, elsewhere)


def test_a_full_disk_during_generation_is_one_resumable_line(inputs):
    """ENOSPC at a shard's write (injected in the actor): StageFailed, one line, no traceback, no
    manifest and no partial shard; the shards written before it are kept for the rerun."""
    from cardiomotion.errors import StageFailed
    from cardiomotion.generate import generate_corpus

    out = inputs["root"] / "full_disk"
    with pytest.raises(StageFailed) as info:
        generate_corpus(inputs["uri"], inputs["prepared"], out, N, seed=SEED, cfg=inputs["cfg"], track=False,
                        _fail_at_shard=(1, "enospc"))
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and "shard-000001.tar" in msg
    assert "rerun the same command to resume" in msg
    assert not (out / "manifest.json").exists() and not (out / "shard-000001.tar").exists()
    assert not list(out.glob(".*tmp*"))


def test_a_full_disk_while_writing_the_manifest_names_it_and_resumes(inputs, monkeypatch, capsys):
    """ENOSPC at the manifest's write (the write call itself fails, as a full disk does): one
    line naming manifest.json, exit 2, no manifest (nor a temporary one); the rerun writes it."""
    import errno

    from cardiomotion.cli import main

    out = inputs["root"] / "full_disk_manifest"
    cfg_file = inputs["root"] / "manifest_enospc.yaml"
    cfg_file.write_text(dump_config(inputs["cfg"]))
    real_write_text = Path.write_text

    def full_disk(self, *a, **k):
        if self.name.startswith(".manifest.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() reports it: no file name
        return real_write_text(self, *a, **k)

    argv = ["generate", "--model", inputs["uri"], "--prepared", str(inputs["prepared"]), "--out", str(out),
            "--n", str(N), "--seed", str(SEED), "--config", str(cfg_file), "--no-track"]
    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"{out / 'manifest.json'}: No space left on device" in err[0] and "rerun the same command" in err[0]
    assert not (out / "manifest.json").exists() and not list(out.glob(".*tmp*"))
    assert len(list(out.glob("shard-*.tar"))) > 0
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert main(argv) == 0
    assert (out / "manifest.json").is_file()


@pytest.mark.slow
def test_resume_after_interrupted_run(corpus, inputs, capsys):
    """A run dies at shard 2 (a stale temp file left behind, shard 0 lost too); the CLI rerun
    writes only the missing shards, leaves the finished one untouched and gives the same bytes."""
    from cardiomotion.cli import main
    from cardiomotion.generate import generate_corpus, open_corpus

    out = inputs["root"] / "resumed"
    with pytest.raises(RuntimeError, match="injected failure at shard 2"):
        generate_corpus(inputs["uri"], inputs["prepared"], out, N, seed=SEED, cfg=inputs["cfg"], track=False,
                        _fail_at_shard=2)
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in out.glob("shard-*.tar"))
    assert "shard-000002.tar" not in done
    (out / ".shard-000002.tar.abc123.tmp.tar").write_bytes(b"half a shard")  # as a killed writer leaves it
    (out / "shard-000000.tar").unlink(missing_ok=True)
    kept = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("shard-*.tar")}
    cfg_file = inputs["root"] / "resume.yaml"
    cfg_file.write_text(dump_config(inputs["cfg"]))
    rc = main(["generate", "--model", inputs["uri"], "--prepared", str(inputs["prepared"]),
               "--out", str(out), "--n", str(N), "--seed", str(SEED), "--config", str(cfg_file), "--no-track"])
    assert rc == 0
    assert f"{len(kept)} shards already complete" in capsys.readouterr().out
    for name, stamp in kept.items():
        p = out / name
        assert (p.stat().st_mtime_ns, p.stat().st_ino) == stamp, f"{name} was rewritten"
    assert not list(out.glob(".*tmp*"))
    c = open_corpus(out)
    assert len(c) == N and sorted(c[i]["meta"]["index"] for i in range(N)) == list(range(N))
    assert c.verify() == []
    assert _digests(out) == _digests(corpus[0])  # same model, seed, settings: the same bytes


def _anon_rss_mb() -> float:
    from cardiomotion.generate.memory import current_rss_mb, release_free_memory

    release_free_memory()
    return current_rss_mb()


@pytest.mark.slow
def test_driver_and_actor_memory_stay_flat_as_n_grows(inputs, corpus):
    """8 vs 32 samples (1 vs 4 shards of 8; 24 more samples weigh 7.5 MiB): the driver never
    holds samples (its Python heap peak and RSS growth do not depend on N) and an actor's heap
    does not grow with the shards it writes (Python + numpy allocations, traced exactly; RSS
    differs by ±20 MiB between worker processes and cannot show a leak this small)."""
    from cardiomotion.generate import generate_corpus

    cfg = inputs["cfg"].model_copy(deep=True)
    cfg.generate.shard_size = 8
    cfg.generate.batch_size = 4
    cfg.generate.previews = 0
    runs = {}
    for n in (8, 32):  # after the `corpus` fixture: the driver has imported and run everything once
        before = _anon_rss_mb()
        tracemalloc.start()
        man = generate_corpus(inputs["model_dir"], inputs["prepared"], inputs["root"] / f"mem_{n}", n, seed=1,
                              cfg=cfg, track=False, _trace_memory=True)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        runs[n] = {"heap_peak": peak / 2**20, "rss_growth": _anon_rss_mb() - before,
                   **json.loads(man.read_text())["run"]}
    leak_mb = 24 * 32**3 * (2 + 2 + 6) / 2**20  # what holding the 24 extra samples would cost
    keys = ("heap_peak", "rss_growth", "actor_traced_mb_by_shard", "actor_traced_peak_mb", "actor_peak_rss_mb")
    summary = {n: {k: r[k] for k in keys} for n, r in runs.items()}
    assert runs[32]["heap_peak"] < runs[8]["heap_peak"] + leak_mb / 4, summary
    # RSS can also shrink during a run (the allocator returns memory held from before it): a
    # negative growth at N 8 is no lower baseline for N 32, so it counts as 0
    assert runs[32]["rss_growth"] < max(runs[8]["rss_growth"], 0.0) + leak_mb / 2, summary
    kept = runs[32]["actor_traced_mb_by_shard"]  # live heap after each of the 4 shards
    assert len(kept) == 4 and max(kept) - kept[0] < 0.25, summary  # one shard is 2.5 MiB
    assert runs[32]["actor_traced_peak_mb"] < runs[8]["actor_traced_peak_mb"] + 0.5, summary


def test_generation_run_is_logged_to_mlflow(corpus, inputs):
    import mlflow

    from cardiomotion.tracking import tracking_uri

    man = json.loads(corpus[1].read_text())
    run_id = man["run"]["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri(inputs["cfg"]))
    run = client.get_run(run_id)
    assert run.data.params["n"] == str(N) and run.data.params["seed"] == str(SEED)
    assert run.data.params["model_uri"] == inputs["uri"] and run.data.tags["source_run_id"] == inputs["run_id"]
    assert run.data.metrics["generated_samples"] == N and run.data.metrics["samples_per_s"] > 0
    assert run.data.metrics["mb_per_s"] > 0
    figures = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert {"figures/sample_000000000.png", "figures/transition_000000000.gif"} <= figures
    assert any(f.startswith("figures/traversal_") for f in figures)
    assert [a.path for a in client.list_artifacts(run_id, "corpus")] == ["corpus/manifest.json"]


def test_latent_traversal_decodes_along_unit_directions(inputs):
    from cardiomotion.generate import latent_directions, latent_traversal, load_frames
    from cardiomotion.generate.model import load_networks, resolve_model

    resolved = resolve_model(inputs["model_dir"], inputs["cfg"])
    model, pyramid = load_networks(resolved.blobs())
    es = load_frames(inputs["prepared"])["es"][0]
    dirs = latent_directions(model.latent_shape((32, 32, 32)), 2, "channels")
    assert torch.allclose(dirs.flatten(1).norm(dim=1), torch.ones(2))
    flows = latent_traversal(model, pyramid, es, resolved.window, dirs, [-2.0, 0.0, 2.0])
    assert flows.shape == (2, 3, 3, 32, 32, 32)
    torch.testing.assert_close(flows[0, 1], flows[1, 1])  # α = 0: both at the prior mean
    assert not torch.allclose(flows[0, 0], flows[0, 2])


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_are_refused_before_any_work(corpus, inputs, tmp_path):
    from cardiomotion.generate import generate_corpus
    from cardiomotion.generate.synthetic import make_random_model_dir

    cfg, prep = inputs["cfg"], inputs["prepared"]
    new = tmp_path / "new"

    def refuse(match, model=inputs["model_dir"], out=new, n=N, seed=SEED, **kw):
        with pytest.raises(InputError, match=match):
            generate_corpus(model, prep, out, n, seed=seed, cfg=cfg, track=False, **kw)

    refuse("model URI does not resolve", model="runs:/0123456789abcdef0123456789abcdef/model")
    refuse("model does not resolve", model=tmp_path / "no_such_model")
    (tmp_path / "empty_model").mkdir()
    refuse("missing cvae.pt, feature_pyramid.pt, model.json", model=tmp_path / "empty_model")
    wrong = make_random_model_dir(tmp_path / "m48", grid=(48, 48, 48), flow_std=0.5)
    refuse(r"model grid \[48, 48, 48\] does not match the prepared data's grid \[32, 32, 32\]", model=wrong)
    refuse("number of samples must be a positive integer", n=0)
    refuse("number of samples must be a positive integer", n=-3)
    refuse("temperature", temperature=-1.0)
    assert not new.exists()  # nothing was created

    existing = corpus[0]
    before = {p.name: p.stat().st_mtime_ns for p in existing.iterdir()}
    refuse("holds a corpus made with seed 7, not 8", out=existing, seed=8)
    other = make_random_model_dir(tmp_path / "other", grid=(32, 32, 32), seed=5)
    refuse("holds a corpus made with another model", model=other, out=existing)
    refuse("more than --n 4; it is never cut down", out=existing, n=4)
    cfg2 = cfg.model_copy(deep=True)
    cfg2.generate.shard_size = 5
    with pytest.raises(InputError, match="other settings .*shard_size: 4 → 5"):
        generate_corpus(inputs["model_dir"], prep, existing, N, seed=SEED, cfg=cfg2, track=False)
    assert {p.name: p.stat().st_mtime_ns for p in existing.iterdir()} == before  # untouched

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    refuse("is not empty and holds no corpus", out=stray)


def test_a_checkpoint_that_is_not_plain_weights_is_refused_unread_naming_its_file(inputs, tmp_path, recwarn):
    """A model folder whose feature_pyramid.pt is a pickle that would run a command when loaded
    (the torch.save zip format and a bare protocol-4 pickle): refused in one line naming that file
    and what the unpickler refused, without torch's advice to load it with weights_only=False and
    without torch's protocol warning; the command never ran."""
    import pickle
    import shutil

    from cardiomotion.generate.model import resolve_model

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name, write in (("zip", lambda f: torch.save({"kind": "feature_pyramid", "x": Evil()}, f)),
                        ("raw", lambda f: f.write_bytes(pickle.dumps(Evil(), protocol=4)))):
        model = tmp_path / name
        shutil.copytree(inputs["model_dir"], model)
        write(model / "feature_pyramid.pt")
        with pytest.raises(InputError) as exc:
            resolve_model(model, inputs["cfg"])
        msg = str(exc.value)
        assert msg.startswith(f"{model / 'feature_pyramid.pt'}: unreadable checkpoint (ValueError: holds more than "
                              "tensors and plain types"), msg
        assert ("posix.system" in msg) == (name == "zip") and "weights_only` set to `False" not in msg, msg
        assert "\n" not in msg and not marker.exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_a_plan_without_shards_does_not_claim_the_folder(corpus, tmp_path):
    """A run that stopped before its first shard (e.g. MLflow unreachable) leaves plan.json only:
    another seed may then use the folder; a folder with shards still refuses another corpus."""
    import json
    import shutil

    from cardiomotion.generate.identity import PLAN, check_out

    plan = json.loads((corpus[0] / PLAN).read_text())
    other = {**plan["identity"], "seed": plan["identity"].get("seed", 0) + 1}
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy2(corpus[0] / PLAN, lone / PLAN)
    assert check_out(lone, other, N, 4) is None
    with pytest.raises(InputError, match="holds a corpus"):
        check_out(corpus[0], other, N, 4)


def test_cli_reports_bad_input_in_one_line(inputs, capsys, tmp_path):
    from cardiomotion.cli import main

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_config(inputs["cfg"]))
    conf = ["--config", str(cfg_file), "--no-track"]

    rc = main(["generate", "--model", "runs:/feedfacefeedfacefeedfacefeedface/model", "--prepared",
               str(inputs["prepared"]), "--out", str(inputs["root"] / "cli_bad"), "--n", "3", *conf])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not resolve" in err[0]
    rc = main(["generate", "--model", str(inputs["model_dir"]), "--prepared", str(inputs["prepared"]),
               "--out", str(inputs["root"] / "cli_bad"), "--n", "0", *conf])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --n: the number of samples must be a positive integer, got 0"]
    rc = main(["generate", "--model", str(inputs["model_dir"]), "--prepared", str(inputs["prepared"]),
               "--out", str(inputs["root"] / "cli_bad"), "--n", "3", "--temperature", "-1", *conf])
    assert rc == 2 and "generate.temperature" in capsys.readouterr().err
    assert not (inputs["root"] / "cli_bad").exists()


@pytest.mark.slow
def test_generate_from_single_frames_of_any_format(inputs, ray_session, tmp_path, capsys):
    """`generate --frames`: 3-D frames in NIfTI, NRRD and MetaImage, prepared on the model's grid as
    `prepare` prepares an ES frame (known answer: a 2-phase study whose ED equals its ES prepares
    its ES to the very array the lone frame prepares to), sources in the manifest, rerun resumes."""
    import nibabel as nib
    from test_nrrd_metaimage import write_metaimage, write_nrrd

    from cardiomotion.cli import main
    from cardiomotion.data.phantom import make_cohort
    from cardiomotion.data.prepare import prepare_scan
    from cardiomotion.data.scan import read_scan
    from cardiomotion.orientation import lps_to_ras

    folder = Path(make_cohort(tmp_path / "cohort", patients=1, grid=40, workers=1)[0])
    meta = json.loads((folder / "meta.json").read_text())
    img = nib.load(str(folder / "ct.nii.gz"))
    es = np.asarray(img.dataobj[..., meta["es_phase"]]).astype(np.int16)
    frames = tmp_path / "frames_in"
    frames.mkdir()
    nib.save(nib.Nifti1Image(es, img.affine), str(frames / "f_nifti.nii.gz"))
    write_nrrd(frames / "f_nrrd.nrrd", es, lps_to_ras(img.affine), encoding="gzip")
    write_metaimage(frames / "f_mha.mha", es, lps_to_ras(img.affine))
    study = tmp_path / "study.nii.gz"  # ES twice: prepare centres on "ED" = the same frame
    nib.save(nib.Nifti1Image(np.stack([es, es], -1), img.affine), str(study))

    out = tmp_path / "corpus_frames"
    cfg_file = tmp_path / "frames.yaml"
    cfg_file.write_text(dump_config(inputs["cfg"]))
    argv = ["generate", "--model", inputs["uri"], "--frames", *(str(p) for p in sorted(frames.iterdir())),
            "--out", str(out), "--n", "6", "--seed", "3", "--config", str(cfg_file), "--no-track"]
    assert main(argv) == 0, capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    assert man["n"] == 6 and man["prepared"] == str(out / "frames")
    by_id = {s["scan_id"]: s for s in man["scans"]}
    assert set(by_id) == {"f_nifti", "f_nrrd", "f_mha"}
    assert {(s["format"], s["phases_from"]) for s in man["scans"]} == {
        ("nifti", "frame"), ("nrrd", "frame"), ("metaimage", "frame")}
    assert by_id["f_nrrd"]["source"] == str((frames / "f_nrrd.nrrd").resolve())
    prepared = {sid: np.asarray(nib.load(str(out / "frames" / sid / "es.nii.gz")).dataobj) for sid in by_id}
    assert all(a.shape == (32, 32, 32) and a.dtype == np.int16 for a in prepared.values())
    np.testing.assert_array_equal(prepared["f_nrrd"], prepared["f_nifti"])  # same frame, two formats
    np.testing.assert_array_equal(prepared["f_mha"], prepared["f_nifti"])

    pcfg = inputs["cfg"].prepare.model_copy(update={"grid": [32, 32, 32], "spacing_mm": 4.0})
    scan = read_scan(study)
    rec = prepare_scan(scan, tmp_path / "prep_study", pcfg, {"study": (0, 1)})
    ref = nib.load(str(tmp_path / "prep_study" / rec["es_path"]))
    np.testing.assert_array_equal(np.asarray(ref.dataobj), prepared["f_nifti"])
    np.testing.assert_allclose(ref.affine, nib.load(str(out / "frames" / "f_nifti" / "es.nii.gz")).affine)

    capsys.readouterr()
    assert main(argv) == 0  # a rerun resumes: nothing to do
    assert "already holds the complete 6-sample corpus" in capsys.readouterr().out
    table = (out / "frames" / "scans.parquet").read_bytes()
    more = argv[:4] + [str(study)] + argv[4:]  # one more frame into the same corpus: refused, nothing touched
    assert main(more) == 2
    assert "holds a corpus conditioned on other frames" in capsys.readouterr().err
    assert (out / "frames" / "scans.parquet").read_bytes() == table and not (out / "frames" / "study").exists()

    bad = ["generate", "--model", inputs["uri"], "--frames", str(tmp_path / "notes.txt"), "--out",
           str(tmp_path / "c2"), "--n", "2", "--config", str(cfg_file), "--no-track"]
    (tmp_path / "notes.txt").write_text("x")
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt: not a 3-D frame" in err[0]
    assert not (tmp_path / "c2").exists()  # refused before anything was written
    zero = ["generate", "--model", inputs["uri"], "--frames", str(frames / "f_nifti.nii.gz"), "--out",
            str(tmp_path / "c3"), "--n", "0", "--config", str(cfg_file), "--no-track"]
    assert main(zero) == 2 and "--n: the number of samples must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "c3").exists()  # the frames were prepared before N was checked
    flow5d = tmp_path / "flow5d.nii.gz"  # a displacement file (I, J, K, 1, 3) given as a frame: refused in the pipeline
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 1, 3), np.float32), img.affine), str(flow5d))
    assert main(zero[:4] + [str(flow5d)] + zero[5:8] + ["2"] + zero[9:]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "c3").exists()
    onto_prepared = ["generate", "--model", inputs["uri"], "--frames", str(frames / "f_nifti.nii.gz"),
                     "--out", str(out.parent / "from_prepared"), "--n", "2", "--config", str(cfg_file), "--no-track"]
    assert main(["generate", "--model", inputs["uri"], "--prepared", str(inputs["prepared"]), "--out",
                 str(out.parent / "from_prepared"), "--n", "2", "--config", str(cfg_file), "--no-track"]) == 0
    capsys.readouterr()
    assert main(onto_prepared) == 2
    assert "holds a corpus made from --prepared data" in capsys.readouterr().err


def test_only_a_lost_worker_is_a_resumable_stage_failure():
    """An actor, worker or node lost (OOM, preemption) is the environment: StageFailed, one line.
    Anything else (a bug, a bad blob) keeps its traceback as a RuntimeError."""
    import ray.exceptions as rex

    from cardiomotion.generate.run import lost_worker

    assert lost_worker(rex.RayActorError())
    try:
        raise RuntimeError("wrapped by Ray Data") from rex.OutOfMemoryError("task killed: out of memory")
    except RuntimeError as exc:
        assert lost_worker(exc)
    assert not lost_worker(ValueError("ES frames must be int16 HU"))


def test_a_second_generate_on_the_same_corpus_is_refused(corpus, inputs):
    """While one `generate` holds the corpus folder's lock, another is refused in one line."""
    import fcntl

    from cardiomotion.generate import generate_corpus

    out, _ = corpus
    with open(out / ".generate.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match="another `generate` is writing this corpus right now"):
            generate_corpus(inputs["uri"], inputs["prepared"], out, N, seed=SEED, cfg=inputs["cfg"], track=False)
        fcntl.flock(held, fcntl.LOCK_UN)


def test_ray_dataset_reads_the_corpus_as_corpus_getitem(corpus):
    """open_corpus(DIR).ray_dataset() (ray.data.read_webdataset) holds exactly Corpus[i], every i once."""
    from cardiomotion.generate import open_corpus

    out, _ = corpus
    c = open_corpus(out)
    rows = sorted(c.ray_dataset(shuffle_seed=0).take_all(), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(len(c)))
    batches = list(c.ray_dataset().drop_columns(["scan_id"]).iter_torch_batches(batch_size=4))
    assert sum(len(b["index"]) for b in batches) == len(c)
    assert batches[0]["es"].dtype == torch.int16 and batches[0]["flow"].dtype == torch.float16
    assert tuple(batches[0]["flow"].shape[1:]) == (3, 32, 32, 32)
    for r in rows:
        s = c[r["index"]]
        assert r["scan_id"] == s["scan_id"]
        for k in ("es", "ed_syn", "flow", "affine"):
            assert r[k].dtype == s[k].dtype and np.array_equal(r[k], s[k]), k
    # limit: the first N samples only (a shard boundary and mid-shard), as the N-sample corpus
    for limit in (c.shard_size, c.shard_size + 1):
        got = sorted(r["index"] for r in c.ray_dataset(limit=limit).select_columns(["index"]).take_all())
        assert got == list(range(limit))
    with pytest.raises(ValueError, match="limit"):
        c.ray_dataset(limit=len(c) + 1)


def test_virtual_corpus_equals_the_materialised_corpus(corpus, inputs):
    """On-the-fly generation yields the arrays `generate` wrote (CPU, same plan), by index and
    through Ray Data."""
    from cardiomotion.generate import open_corpus, open_virtual_corpus

    out, _ = corpus
    c = open_corpus(out)
    v = open_virtual_corpus(inputs["uri"], inputs["prepared"], len(c), seed=SEED, cfg=inputs["cfg"])
    assert len(v) == len(c) == N
    for i in (0, 5, N - 1, -1):
        a, b = v[i], c[i]
        assert a.keys() == b.keys() and a["index"] == b["index"] and a["scan_id"] == b["scan_id"]
        assert a["meta"] == b["meta"]  # the JSON the corpus stores beside the arrays
        for k in ("es", "ed_syn", "flow", "affine"):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (i, k)
    for bad, error in ((3.7, TypeError), (N, IndexError), (-N - 1, IndexError)):
        for reader in (v, c):  # a float is no sample number (it read as int(3.7) = 3 before)
            with pytest.raises(error):
                reader[bad]
    assert c[np.int64(2)]["index"] == 2
    rows = sorted(v.ray_dataset(actors=1, shuffle_seed=1).take_all(), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(N))
    for r in rows:
        s = c[r["index"]]
        assert r["scan_id"] == s["scan_id"]
        for k in ("es", "ed_syn", "flow", "affine"):
            assert np.array_equal(r[k], s[k]) and r[k].dtype == s[k].dtype, (r["index"], k)


def test_velocity_models_animate_along_exp_tv(inputs, ray_session, tmp_path):
    """A velocity model's ES→ED path is exp(t·v): the sample's v is decoded again from (model, seed,
    index), exp(v) is the stored flow, and the GIF's frames follow exp(t·v), which differs from the
    straight line t·u for a non-constant field and equals it for a translation (exp(t·v) = t·v)."""
    from PIL import Image

    from cardiomotion.flow.ops import exp
    from cardiomotion.generate import generate_corpus, open_corpus
    from cardiomotion.generate.figures import transition_gif
    from cardiomotion.generate.previews import sample_velocity
    from cardiomotion.generate.synthetic import make_random_model_dir

    model = make_random_model_dir(tmp_path / "vel_model", grid=(32, 32, 32), channels=(8, 16, 32), latent_channels=4,
                                  output="velocity", flow_std=2.0)
    cfg = load_config(None, {**inputs["cfg"].model_dump(mode="json"),
                             "generate": {**GEN, "previews": 0}})
    out = tmp_path / "vel_corpus"
    generate_corpus(model, inputs["prepared"], out, 3, seed=SEED, cfg=cfg, track=False)
    s = open_corpus(out)[1]
    v = sample_velocity(out, 1, cfg=cfg)
    assert v.shape == (3, 32, 32, 32) and v.dtype == np.float32
    u = exp(torch.from_numpy(v)[None])[0].numpy()
    assert np.abs(u - s["flow"].astype(np.float32)).max() < 2e-2  # stored as float16
    assert sample_velocity(inputs["root"] / "corpus", 0, cfg=cfg) is None  # a displacement model's corpus

    def frames(path):
        im = Image.open(path)
        got = []
        for k in range(im.n_frames):
            im.seek(k)
            got.append(np.asarray(im.convert("L"), dtype=np.int16))
        return got

    lin = frames(transition_gif(s["es"], s["flow"], tmp_path / "lin.gif", frames=5))
    vel = frames(transition_gif(s["es"], s["flow"], tmp_path / "vel.gif", frames=5, velocity=v))
    assert np.array_equal(lin[0], vel[0]) and np.array_equal(lin[4], vel[4])  # t = 0 and t = 1 agree
    assert any(not np.array_equal(a, b) for a, b in zip(lin[1:4], vel[1:4]))  # the path between differs
    shift = np.zeros((3, 32, 32, 32), np.float32)
    shift[0] = 2.0  # a translation: exp(t·v) = t·v, the same frames
    a = frames(transition_gif(s["es"], shift, tmp_path / "a.gif", frames=5))
    b = frames(transition_gif(s["es"], shift, tmp_path / "b.gif", frames=5, velocity=shift))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
