"""cardiomotion: systole-conditioned generative cardiac motion on Ray.

Stages (each a CLI sub-command, a Ray job in ``jobs/`` and a library call):
``phantom`` → ``prepare`` → ``annotate`` → ``train``/``cv``/``tune`` → ``generate``.
Conventions (orientation, units, flow direction) are fixed in ``cardiomotion.orientation``
and ``cardiomotion.flow``; see the README.
"""
from __future__ import annotations

__version__ = "0.1.0"
