"""What a corpus shows and how one sample is made again: preview figures (samples, the ES→ED GIF,
the latent traversal), a sample's velocity (velocity models), and :func:`regenerate_sample`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import Config, load_config
from ..errors import InputError
from ..layout import PREVIEWS, SAMPLE_MEMBERS, preview_sample_name, preview_traversal_name, preview_transition_name
from .conditioning import load_frames
from .corpus import open_corpus, read_manifest
from .engine import SampleEngine, SampleSpec, block_of, deterministic_cudnn, sample_key
from .model import ResolvedModel, load_networks, resolve_corpus_model

Log = Callable[[str], None]


def traversal_figure(resolved: ResolvedModel, es_hu: np.ndarray, spacing_mm: float, path: str | Path,
                     cfg: Config, title: str | None = None, view: str = "coronal") -> Path:
    """Decode a latent traversal for one ES frame (on this process' GPU if it has one, else the
    CPU) and save the mosaic PNG."""
    import torch

    from .figures import plot_traversal
    from .traversal import latent_directions, latent_traversal

    g = cfg.generate
    model, pyramid = load_networks(resolved.blobs(), "cuda" if torch.cuda.is_available() else "cpu")
    grid = tuple(int(x) for x in es_hu.shape[-3:])
    dirs = latent_directions(model.latent_shape(grid), max(1, g.traversal_directions), "channels")
    alphas = list(np.linspace(-g.traversal_range, g.traversal_range, g.traversal_steps))
    with deterministic_cudnn(torch.cuda.is_available()):  # the same mosaic on every run, as the corpus
        flows = latent_traversal(model, pyramid, es_hu, resolved.window, dirs, alphas)
    return plot_traversal(es_hu, flows, alphas, path, spacing_mm=spacing_mm, view=view, title=title,
                          labels=[f"latent channel {c}" if c < model.latent_channels else f"random {c}"
                                  for c in range(len(dirs))])


def write_previews(out: str | Path, resolved: ResolvedModel, cfg: Config, log: Log = lambda _m: None) -> list[Path]:
    """``previews/``: the first samples (orthogonal slices), the ES→ED GIF of sample 0 and the
    latent-traversal mosaic of sample 0's scan."""
    from .figures import plot_sample, transition_gif

    g = cfg.generate
    corpus = open_corpus(out)
    pdir = Path(out) / PREVIEWS
    paths = []
    for i in range(min(g.previews, len(corpus))):
        paths.append(plot_sample(corpus[i], pdir / preview_sample_name(sample_key(i))))
    if g.previews:
        s0 = corpus[0]
        paths.append(transition_gif(s0["es"], s0["flow"], pdir / preview_transition_name(sample_key(0)), frames=g.gif_frames,
                                    velocity=sample_velocity(out, 0, model=resolved, cfg=cfg)))
        if g.traversal_directions:
            paths.append(traversal_figure(resolved, s0["es"], float(s0["meta"]["spacing_mm"]),
                                          pdir / preview_traversal_name(s0['scan_id']), cfg,
                                          title=f"latent traversal, {s0['scan_id']} (T-independent, z0 = 0)"))
    for p in paths:
        log(f"  preview {p}")
    return paths


def sample_engine(corpus_dir: str | Path, index: int, model, prepared, cfg: Config | None,
                   device: str) -> tuple[SampleEngine, dict[str, Any]]:
    """The engine that made a corpus (model and frames checked against its manifest) and the manifest."""
    cfg = cfg or load_config(None)
    man = read_manifest(corpus_dir)
    n = int(man["n"])
    if not 0 <= index < n:
        raise IndexError(f"sample {index} out of range: the corpus has {n} samples")
    resolved = model if isinstance(model, ResolvedModel) else resolve_corpus_model(man, model, cfg)
    if resolved.cvae_sha256 != man["model"]["cvae_sha256"] or resolved.pyramid_sha256 != man["model"]["pyramid_sha256"]:
        raise InputError(resolved.uri, "is not the model this corpus was made with (sha256 differs)")
    frames = load_frames(prepared or man["prepared"])
    if frames["es_sha256"] != [s["es_sha256"] for s in man["identity"]["scans"]]:
        raise InputError(frames["prepared"], "ES frames differ from those this corpus was made with")
    ident = man["identity"]
    spec = SampleSpec(seed=man["seed"], temperature=man["temperature"], window=ident["window"],
                      flow_dtype=ident["flow_dtype"], model_uri=man["model"]["uri"],
                      model_sha256=man["model"]["cvae_sha256"])
    engine = SampleEngine(resolved.blobs(), frames, spec, device, ident["precision"], man["config"]["channels_last"])
    return engine, man


def sample_velocity(corpus_dir: str | Path, index: int, *, model: str | Path | ResolvedModel | None = None,
                    prepared: str | Path | None = None, cfg: Config | None = None) -> np.ndarray | None:
    """The stationary velocity v of sample ``index`` ((3, I, J, K) float32 voxels; its flow is
    exp(v)) when the corpus' model predicts velocities, else None. Decoded again from (model,
    seed, index): the corpus stores exp(v) only."""
    man = read_manifest(corpus_dir)
    if (man.get("model", {}).get("meta") or {}).get("output") != "velocity":
        return None
    engine, _ = sample_engine(corpus_dir, index, model, prepared, cfg, "cpu")
    return engine.velocities([index])[0]


def regenerate_sample(corpus_dir: str | Path, index: int, *, model: str | Path | None = None,
                      prepared: str | Path | None = None, cfg: Config | None = None, device: str = "cpu",
                      raw: bool = False) -> dict[str, Any]:
    """Make sample ``index`` of a corpus again from (model, seed, index) alone.

    Decodes the sample's block (:func:`~cardiomotion.generate.engine.block_of`) with the corpus'
    model (its URI, or ``model``; hashes checked) and prepared ES frames (the recorded folder, or
    ``prepared``; hashes checked). On the same kind of device and precision the bytes equal the
    stored ones. Returns ``raw`` member bytes {"es.npy", …} or a dict like ``Corpus[i]``.
    """
    from .corpus import decode_member, sample_dict

    engine, man = sample_engine(corpus_dir, index, model, prepared, cfg, device)
    n = int(man["n"])
    start, stop = block_of(index, n, man["shard_size"], man["batch_size"])
    idx = list(range(start, stop))
    members = dict(engine.members(engine.decode_block(idx), idx))
    key = sample_key(index)
    mine = {m: members[f"{key}.{m}"] for m in SAMPLE_MEMBERS}
    return mine if raw else sample_dict(index, {m: decode_member(m, b) for m, b in mine.items()})
