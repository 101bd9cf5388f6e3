"""Process-wide defaults for coding, applied when coding is first used (never by ``import wsi_idf``).

``OMP_WAIT_POLICY=PASSIVE``, unless the environment already says: a waiting OpenMP thread sleeps
instead of spinning, so another process using a core costs a share of speed, not nine tenths of it
(``coding.threads``). OpenMP reads it when torch loads, so it is set as the coding package is
imported, before any of its modules imports torch; a process that imported torch first keeps its
own setting.
"""
from __future__ import annotations

import os
import sys


def configure_runtime() -> None:
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
