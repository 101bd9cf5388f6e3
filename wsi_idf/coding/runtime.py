"""Process-wide defaults for coding, applied as wsi-idf first imports torch (never by ``import wsi_idf``).

Every coding module takes torch from here (``from .runtime import torch``), so the defaults are set
before torch loads OpenMP, whichever module comes first.

``OMP_WAIT_POLICY=PASSIVE``, unless the environment already says: a waiting OpenMP thread sleeps
instead of spinning, so another process using a core costs a share of speed, not nine tenths of it
(``coding.threads``). OpenMP reads it when torch loads; a process that imported torch before
wsi-idf keeps its own setting.
"""
from __future__ import annotations

import os
import sys


def configure_runtime() -> None:
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


configure_runtime()

import torch  # noqa: E402 - after the defaults, on purpose

__all__ = ["configure_runtime", "torch"]
