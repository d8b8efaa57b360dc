"""Mass generation of flow-annotated (ES, ED_syn, flow) corpora and reading them back.

* :func:`generate_corpus` — the Ray Data generation job (resumable, sharded, MLflow-tracked).
* :func:`open_corpus` — random access and a streaming PyTorch ``IterableDataset``.
* :func:`regenerate_sample` — sample i again from (model, seed, i) alone (same bytes).
* :func:`export_sample` — NIfTI (flow as intent 1006), ES→ED GIF, latent-traversal mosaic.
* :func:`latent_traversal` / :func:`latent_directions` — decoding along latent directions.

The corpus format is described in docs/corpus.md.
"""
from __future__ import annotations

from .corpus import Corpus, CorpusIterableDataset, open_corpus, read_manifest
from .engine import sample_seed, scan_indices
from .export import export_sample
from .job import generate_corpus, load_frames, regenerate_sample
from .model import ResolvedModel, resolve_model
from .traversal import latent_directions, latent_traversal

__all__ = [
    "Corpus", "CorpusIterableDataset", "ResolvedModel", "export_sample", "generate_corpus", "latent_directions",
    "latent_traversal", "load_frames", "open_corpus", "read_manifest", "regenerate_sample", "resolve_model",
    "sample_seed", "scan_indices",
]
