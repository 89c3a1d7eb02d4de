"""End a multi-process test worker without tripping over teardown races."""
from __future__ import annotations

import os
import sys

import torch.distributed as dist


def exit_worker(code: int = 0) -> None:
    """Destroy the process group, flush, and leave with os._exit.

    A worker's optimizers and models still reference the process group, so gloo's threads
    outlive destroy_process_group, and an interpreter exit that finds one freeing a collective's
    tensors aborts ("terminate called without an active exception"; Engine.close explains and
    avoids it for launch/train.py). The worker's results are already written, so nothing after
    this point matters to the test."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
