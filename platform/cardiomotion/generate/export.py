"""Export one corpus sample for 3D Slicer / ITK: NIfTI volumes, the flow as a displacement
field (intent 1006, RAS mm), an ES→ED GIF and optionally the latent-traversal mosaic."""
from __future__ import annotations

from pathlib import Path

from ..config import Config, load_config
from ..fileio import atomic_dir, write_json, write_nifti
from ..layout import EXPORT_ED_SYN, EXPORT_ES, EXPORT_FLOW, EXPORT_GIF, EXPORT_META, EXPORT_TRAVERSAL

#: every file an export may hold: a folder of these alone is an earlier export, replaced as a whole
EXPORT_FILES = frozenset({EXPORT_ES, EXPORT_ED_SYN, EXPORT_FLOW, EXPORT_META, EXPORT_GIF, EXPORT_TRAVERSAL})


def export_sample(corpus_dir: str | Path, index: int, out_dir: str | Path, *, gif: bool = True,
                  traversal: bool = False, model: str | Path | None = None, cfg: Config | None = None) -> dict[str, Path]:
    """Write sample ``index`` of a corpus to ``out_dir``; returns {name: path}.

    Files: ``es.nii.gz`` and ``ed_syn.nii.gz`` (int16 HU), ``flow.nii.gz`` (5-D float32, intent
    1006, RAS mm: a displacement-field transform in Slicer/ITK/SimpleITK), ``sample.json``
    (metadata describing those files; the corpus's own flow description, voxels in float16, under
    ``corpus_sample``), ``transition.gif`` (ES → ED_syn), and with ``traversal`` ``traversal.png`` (the
    latent traversal of this sample's ES frame, decoded with the corpus' model — or ``model``,
    whose hash must match).

    ``out_dir`` is new, empty, or an earlier export (nothing but :data:`EXPORT_FILES`), which is
    replaced as a whole once the new files are complete: no file of another sample stays beside them.

    Raises:
        InputError: not a complete corpus, a model that is not the corpus' model, ``index``
            outside 0 … N−1 (a negative index is refused: the CLI names samples by their number),
            or an ``out_dir`` that holds anything but an earlier export; each before anything is written.
    """
    import numpy as np

    from ..errors import InputError
    from ..flow.io import write_flow
    from .corpus import open_corpus
    from .figures import transition_gif

    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InputError(out, "exists and is not a folder; use another --out")
    if out.is_dir() and (others := sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)):
        raise InputError(out, f"holds {', '.join(others[:3])}{' …' if len(others) > 3 else ''}, not an export: "
                              "use a new or empty --out (an earlier export there is replaced)")
    cfg = cfg or load_config(None)
    corpus = open_corpus(corpus_dir)
    if not 0 <= int(index) < len(corpus):
        raise InputError(corpus_dir, f"--index {index} is outside the corpus: it holds samples 0 … {len(corpus) - 1}")
    s = corpus[index]
    resolved = None
    if traversal:  # the model is checked before anything is written
        from .model import resolve_corpus_model

        man = corpus.manifest
        resolved = resolve_corpus_model(man, model, cfg)
        if resolved.cvae_sha256 != man["model"]["cvae_sha256"]:
            raise InputError(resolved.uri, "is not the model this corpus was made with (sha256 differs)")
    velocity = None
    if gif:
        from .previews import sample_velocity

        # a velocity model's path is exp(t·v), decoded again from (model, seed, index)
        velocity = sample_velocity(corpus_dir, index, model=model, cfg=cfg)
    aff = s["affine"]
    # sample.json describes the files beside it: the corpus stores the flow in voxels (float16),
    # flow.nii.gz holds it in RAS mm (float32); the corpus's own description is kept under "corpus_sample"
    stored = {k: s["meta"][k] for k in ("convention", "flow_units", "flow_dtype") if k in s["meta"]}
    meta = {**{k: v for k, v in s["meta"].items() if k not in stored}, "corpus": str(corpus.dir),
            "flow_file": EXPORT_FLOW, "flow_units": "mm", "flow_dtype": "float32",
            "convention": "pull field on the ED grid, RAS world mm, NIfTI intent 1006 (displacement vector), "
                          "shape (I, J, K, 1, 3): ED_syn(x) = ES(x + u(x)); a displacement-field transform in "
                          "ITK/SimpleITK/Slicer as it is",
            "corpus_sample": stored}
    names = {"es": EXPORT_ES, "ed_syn": EXPORT_ED_SYN, "flow": EXPORT_FLOW, "meta": EXPORT_META}
    with atomic_dir(out, replace=True) as tmp:
        write_nifti(tmp / EXPORT_ES, s["es"], aff)
        write_nifti(tmp / EXPORT_ED_SYN, s["ed_syn"], aff)
        write_flow(tmp / EXPORT_FLOW, s["flow"].astype(np.float32), aff)
        write_json(tmp / EXPORT_META, meta)
        if gif:
            transition_gif(s["es"], s["flow"], tmp / EXPORT_GIF, frames=cfg.generate.gif_frames, velocity=velocity)
            names["gif"] = EXPORT_GIF
        if resolved is not None:
            from .previews import traversal_figure

            traversal_figure(resolved, s["es"], float(s["meta"]["spacing_mm"]), tmp / EXPORT_TRAVERSAL, cfg,
                             title=f"latent traversal, {s['scan_id']} (sample {s['index']})")
            names["traversal"] = EXPORT_TRAVERSAL
    return {key: out / name for key, name in names.items()}
