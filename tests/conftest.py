"""Suite-wide hygiene."""
from __future__ import annotations

from pathlib import Path

import pytest

SHM = Path("/dev/shm")
DS_SHM_GLOB = "deepspeed_allreduce_buffer_*"


@pytest.fixture(autouse=True, scope="module")
def _remove_deepspeed_shm_buffers():
    """DeepSpeed's CPU shared-memory all-reduce leaves one ~69 MB buffer per rank in /dev/shm
    after every launch (never unlinked, however the ranks exit): dozens of launches would hold
    GBs of RAM on a 24 GB CI machine. Remove the ones this module's launches created."""
    before = set(SHM.glob(DS_SHM_GLOB)) if SHM.is_dir() else set()
    yield
    if SHM.is_dir():
        for leaked in set(SHM.glob(DS_SHM_GLOB)) - before:
            leaked.unlink(missing_ok=True)
