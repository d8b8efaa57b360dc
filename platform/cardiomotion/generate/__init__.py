"""Mass generation of flow-annotated (ES, ED_syn, flow) corpora and reading them back.

* :func:`generate_corpus` — the Ray Data generation job (resumable, sharded, MLflow-tracked);
  :func:`generate_from_frames` — the same, conditioned on single 3-D frames of any format.
* :func:`open_corpus` — random access, a streaming PyTorch ``IterableDataset``, a Ray Dataset.
* :func:`open_virtual_corpus` — the same samples decoded on the fly (never stored).
* :func:`regenerate_sample` — sample i again from (model, seed, i) alone (same bytes).
* :func:`export_sample` — NIfTI (flow as intent 1006), ES→ED GIF, latent-traversal mosaic.
* :func:`latent_traversal` / :func:`latent_directions` — decoding along latent directions.

The corpus format is described in docs/corpus.md. The names load their modules on first use, so
``cardiomotion.generate.engine`` (decode + warp + the shard writer) imports where only PyTorch
and numpy are installed (the GPU suite's machines), without Ray, MLflow, nibabel or pydantic.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "Corpus": "corpus", "CorpusIterableDataset": "corpus", "open_corpus": "corpus", "read_manifest": "corpus",
    "sample_seed": "engine", "scan_indices": "engine",
    "export_sample": "export",
    "generate_corpus": "job", "generate_from_frames": "job", "load_frames": "conditioning",
    "regenerate_sample": "previews", "sample_velocity": "previews",
    "ResolvedModel": "model", "resolve_model": "model",
    "latent_directions": "traversal", "latent_traversal": "traversal",
    "VirtualCorpus": "virtual", "open_virtual_corpus": "virtual",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
